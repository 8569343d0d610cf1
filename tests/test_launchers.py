"""The launchers as a user runs them: strict config errors, dry run, a short fit that resumes exactly."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TOY = "projects/teacher/configs/toy_8gaussians.yaml"


def run(*args, check=False):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and p.returncode:
        raise AssertionError(f"{args} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def fit_main(*argv, capsys, monkeypatch):
    """``launchers/fit.py ARGV`` in this process (no interpreter start): ``(exit code, stdout, stderr)``."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT / "launchers"))
    import fit

    capsys.readouterr()
    rc = fit.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_unknown_key_wrong_type_and_missing_checkpoint_are_named_errors(tmp_path, capsys, monkeypatch):
    def fit(*argv):
        return fit_main(*argv, capsys=capsys, monkeypatch=monkeypatch)

    rc, _, err = fit(TOY, "module.learning_rate=1e-3", "--dry-run")
    assert rc == 2
    assert "unknown config key 'module.learning_rate'" in err and "accepts:" in err
    rc, _, err = fit(TOY, "data.batch_size=big", "--dry-run")
    assert rc == 2 and "config key 'data.batch_size' has type str, expected int" in err
    rc, _, err = fit(TOY, "trainer.max_stepz=3", "--dry-run")
    assert rc == 2 and "unknown config key 'trainer.max_stepz'" in err
    rc, _, err = fit(TOY, "trainer.max_steps=3", "--dry-run")
    assert rc == 2 and "'trainer.max_steps' is not set by hand" in err and "run.iterations" in err
    rc, _, err = fit(TOY, "bogus.x=1", "--dry-run")
    assert rc == 2 and "unknown config key 'bogus.x'" in err
    missing = tmp_path / "nope.ckpt"
    rc, _, err = fit(TOY, f"run.resume={missing}", f"run.dir={tmp_path / 'r'}")
    assert rc == 2 and f"run.resume: checkpoint not found: {missing}" in err
    # the same through the command line, as a user runs it (the interpreter's exit code)
    p = run("launchers/fit.py", TOY, "bogus.x=1", "--dry-run")
    assert p.returncode == 2 and "unknown config key 'bogus.x'" in p.stderr
    p = run("launchers/sample.py", str(missing))
    assert p.returncode == 2 and f"checkpoint not found: {missing}" in p.stderr
    p = run("launchers/evaluate.py", str(missing))
    assert p.returncode == 2 and f"checkpoint not found: {missing}" in p.stderr


def test_dry_run_prints_the_resolved_config(capsys, monkeypatch):
    rc, out, _ = fit_main(TOY, "module.lr=0.01", "--dry-run", capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0 and "lr: 0.01" in out
    assert "logit_std: 1.0" in out  # a default filled in from the signature
    assert "dir: runs/teacher/toy_8gaussians" in out
    # YAML 1.1 reads 1e-4 as a string; where a float is expected it is the float
    rc, out, _ = fit_main(TOY, "module.lr=1e-4", "--dry-run", capsys=capsys, monkeypatch=monkeypatch)
    assert rc == 0 and "lr: 0.0001" in out


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_fit_writes_a_run_and_resumes_exactly(tmp_path):
    common = ["trainer.log_every_n_steps=1", "trainer.val_check_interval=10", "module.num_samples=200",
              "module.sample_steps=4", "data.batch_size=64", "run.ckpt_every=10"]
    full, part = tmp_path / "full", tmp_path / "part"
    run("launchers/fit.py", TOY, *common, "run.iterations=20", f"run.dir={full}", check=True)
    # the same run stopped at step 10, then resumed from its last checkpoint to step 20
    run("launchers/fit.py", TOY, *common, "run.iterations=10", f"run.dir={part}", check=True)
    assert (part / "checkpoints" / "last.ckpt").is_file()
    p = run("launchers/fit.py", TOY, *common, "run.iterations=20", f"run.dir={part}", check=True)
    assert "Restoring states from the checkpoint" in p.stdout + p.stderr
    a, b = _losses(full), _losses(part)
    assert sorted(a) == list(range(20)) and sorted(b) == list(range(20))
    for step in range(20):
        assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
    # the exported EMA weights are identical too (EMA updates are part of the checkpointed step)
    wa = torch.load(full / "toy_8gaussians_mlp.pt", weights_only=True)["state_dict"]
    wb = torch.load(part / "toy_8gaussians_mlp.pt", weights_only=True)["state_dict"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0)
    assert (full / "config.yaml").read_text().count("iterations: 20") == 1
    assert (full / "toy_8gaussians_mlp.pt").is_file()  # run.export, inside the run directory
    assert sorted(p.name for p in (full / "samples").glob("*.png")) == ["step0000010.png", "step0000020.png"]
    # the exported EMA teacher samples, through sample.py
    out = tmp_path / "s"
    run("launchers/sample.py", str(full / "toy_8gaussians_mlp.pt"), "--steps", "4", "--out", str(out), check=True)
    assert out.with_suffix(".png").stat().st_size > 1000
    import numpy as np

    pts = np.load(out.with_suffix(".npz"))["points"]
    assert pts.shape == (100, 2) and np.isfinite(pts).all()


def _all_configs():
    from common.project_index import projects

    return [str(c.relative_to(ROOT)) for p in projects().values() for c in p.configs()]


def test_every_config_under_projects_dry_runs():
    """Every project's embedded and paper-scale config resolves as ``--dry-run`` resolves it (found by
    folder, not by a list; in this process, and one through the launcher itself)."""
    from common.config import load_config, to_yaml

    configs = _all_configs()
    assert len(configs) >= 8
    for config in configs:
        cfg = load_config(ROOT / config)
        assert cfg["run"]["iterations"] > 0 and "target" in cfg["module"], config
        assert to_yaml(cfg)
    p = run("launchers/fit.py", configs[-1], "--dry-run", check=True)
    assert "target:" in p.stdout and "iterations:" in p.stdout
    # and every benchmark variant of every method (its overrides on the project's config)
    from common.project_index import projects

    for name, project in projects("method").items():
        for variant, overrides in project.benchmark.variants.items():
            assert load_config(project.config, list(overrides))["run"]["iterations"] > 0, (name, variant)


def test_projects_are_discovered_by_their_folder(tmp_path):
    """A project is a folder with a project.yaml: a new one is found with no edit elsewhere."""
    import shutil

    from common.project_index import projects

    found = projects(root=ROOT)
    assert {"swiftbrush", "uni_instruct"} <= set(projects("method", root=ROOT))
    assert {"teacher", "classifier"} <= set(projects("recipe", root=ROOT)) and set(found) >= {"teacher"}
    shutil.copytree(ROOT / "projects" / "swiftbrush", tmp_path / "projects" / "newmethod",
                    ignore=shutil.ignore_patterns("*.png"))
    assert set(projects("method", root=tmp_path)) == {"newmethod"}
    (tmp_path / "projects" / "newmethod" / "project.yaml").write_text("kind: paper\n")
    with pytest.raises(ValueError, match="kind must be one of"):
        projects(root=tmp_path)


def test_validation_callback_batch_arithmetic_and_final_summary(tmp_path, tiny_teacher):
    """A short distillation run: the batch arithmetic at start-up; in-run validation every 2 iterations
    (metrics, grids); final figures at the pinned and the second sampling seed in results.json, printed
    with the grid and checkpoint paths."""
    import json

    out = tmp_path / "r"
    p = run("launchers/fit.py", "projects/swiftbrush/config.yaml", f"module.teacher={tiny_teacher}",
            "run.iterations=4", "data.batch_size=4", "trainer.val_check_interval=2", "validation.num_samples=20",
            "trainer.log_every_n_steps=1", f"run.dir={out}", "trainer.enable_progress_bar=false", check=True)
    assert "batch: global 4 = 1 rank(s) x 4 per rank; 16 samples in all" in p.stdout
    assert "optimizer steps: 8 (critic 4, student 4); phases: main from 0" in p.stdout
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert max(float(r["progress/samples_seen"]) for r in rows if r.get("progress/samples_seen")) == 16.0
    assert len([r for r in rows if r.get("val/fd_1step")]) == 2  # at iterations 2 and 4
    assert sorted(f.name for f in (out / "samples").glob("*.png")) == \
        ["final_1step.png", "it0000002_1step.png", "it0000004_1step.png"]
    res = json.loads((out / "results.json").read_text())
    assert res["iteration"] == 4 and [(r["steps"], r["seed"], r["num_samples"]) for r in res["results"]] == \
        [(1, 0, 1000), (1, 7, 1000)]
    assert res["results"][0]["fd"] != res["results"][1]["fd"]  # another sampling seed, other samples
    for r in res["results"]:
        assert f"1step, seed {r['seed']}: FD {r['fd']:.2f}" in p.stdout
    assert f"grid: {out / 'samples' / 'final_1step.png'}" in p.stdout
    assert f"checkpoint: {out / 'checkpoints' / 'last.ckpt'}" in p.stdout
    # the run's checkpoint loads strictly for sampling, and only with the teacher it was trained with
    from common.checkpoints import load_generator

    last = out / "checkpoints" / "last.ckpt"
    assert load_generator(str(last)).sampler == "multistep"
    ck = torch.load(last, weights_only=True)
    # the EMA samples by default; raw=True (evaluate.py --raw) the student's raw weights
    sd, checked = ck["state_dict"], 0
    for gen, prefix in ((load_generator(str(last)), "ema.ema_model."), (load_generator(str(last), raw=True), "nets.student.")):
        params = dict(gen.denoiser.named_parameters())
        for k, v in sd.items():
            if k.startswith(prefix) and "_net." + k[len(prefix):] in params:
                assert torch.equal(params["_net." + k[len(prefix):]], v), k
                checked += 1
    assert checked > 40 and not torch.equal(sd["ema.ema_model.blocks.0.attn.qkv.weight"],
                                            sd["nets.student.blocks.0.attn.qkv.weight"])
    with pytest.raises(ValueError, match="raw weights and module overrides are a run checkpoint"):
        load_generator("teacher:mnist", raw=True)
    ck["distill"]["frozen"]["teacher"]["sha256"] = "0" * 64
    torch.save(ck, out / "checkpoints" / "other.ckpt")
    with pytest.raises(ValueError, match="trained with another teacher"):
        load_generator(str(out / "checkpoints" / "other.ckpt"))
    ck = torch.load(last, weights_only=True)
    ck["state_dict"]["nets.student.extra"] = torch.zeros(1)
    torch.save(ck, out / "checkpoints" / "extra.ckpt")
    with pytest.raises(ValueError, match="unexpected 1 key"):
        load_generator(str(out / "checkpoints" / "extra.ckpt"))
    p = run("launchers/fit.py", "projects/swiftbrush/config.yaml", "data.batch_size=5", "trainer.devices=2",
            "trainer.strategy=ddp", f"module.teacher={tiny_teacher}", "run.iterations=1", f"run.dir={tmp_path / 'b'}")
    assert p.returncode != 0 and "data.batch_size=5 (the global batch) is not divisible by" in p.stderr


def test_benchmark_gates_each_gated_step_count_of_a_few_step_student():
    """``gates.fd_ratio`` is one bound for 1 step or ``{steps: bound}``; a row of another step count is
    reported, not gated; a gated step count the fit did not measure is an error."""
    import benchmark

    best = {"fd": 10.0, "steps": 32}
    row = lambda steps, fd: {"name": "m", "steps": steps, "num_steps": benchmark._num_steps(steps), "seed": 0,  # noqa: E731
                             "fd": fd, "accuracy": 0.95, "precision": 0.8, "recall": 0.7, "num_samples": 1000,
                             "fit_seconds": 100.0}
    rows = [row(1, 14.0), row([1.57, 1.3, 1.0, 0.6], 13.0), row(2, 99.0)]
    checks = benchmark._student_checks(rows, best, {"fd_ratio": {1: 1.5, 4: 1.2}, "accuracy": 0.9, "fit_seconds": 600})
    fd = {c["check"].split(": ")[1].split(" ")[0]: c["ok"] for c in checks if "FD" in c["check"]}
    assert fd == {"1-step": True, "4-step": False}  # 1.4x passes 1.5; 1.3x misses 1.2; 2 steps not gated
    assert len(checks) == 2 * 2 + 1  # FD and accuracy per gated row, the wall time once
    one = benchmark._student_checks(rows[:1], best, {"fd_ratio": 1.5, "accuracy": 0.9, "fit_seconds": 600})
    assert [c["ok"] for c in one] == [True, True, True]
    with pytest.raises(SystemExit, match=r"gated step count\(s\) \[4\] were not measured"):
        benchmark._student_checks(rows[:1], best, {"fd_ratio": {1: 1.5, 4: 1.2}, "accuracy": 0.9, "fit_seconds": 600})
    table = benchmark._student_table(rows, best, "variant")
    assert "| m | t1.57-1.3-1-0.6 | 0 | 13.00 | 1.30 |" in table


def test_summary_of_a_run_without_final_figures(tmp_path):
    """``validation.final_seeds: []`` skips the final figures; the summary says so instead of failing."""
    from common.validation import summary

    (tmp_path / "results.json").write_text('{"iteration": 4, "results": []}')
    assert summary(tmp_path).splitlines()[0] == "no final figures at iteration 4 (validation.final_seeds is empty)"
