"""Runs never lose, mix or misread work (F5): resume checks what wrote a checkpoint, fresh starts never
mix into an old run, checkpoints fall on iterations, unreadable checkpoints are named and skipped,
evaluation never overwrites a run's figures, and a run killed at any point resumes exactly.

Most cases call the launchers' ``main`` in this process (one interpreter start is seconds); the
kills run ``tests/fault_worker.py`` in a subprocess."""
import csv
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate as evaluate_launcher
import fit
import sample as sample_launcher

ROOT = Path(__file__).resolve().parent.parent
SB = "projects/swiftbrush/config.yaml"
UNI = "projects/uni_instruct/config.yaml"
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "validation.steps=[]",
         "data.batch_size=4", "trainer.log_every_n_steps=1"]


def sb(tiny, run_dir, *extra):
    return [SB, f"module.teacher={tiny}", f"run.dir={run_dir}", *QUIET, *extra]


def fit_ok(args):
    assert fit.main([str(a) for a in args]) == 0


def fit_error(args, capsys) -> str:
    capsys.readouterr()
    assert fit.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err  # one line
    return err


def files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sb_run(tmp_path_factory, tiny_teacher):
    """A finished 2-iteration SwiftBrush run on the tiny teacher (copied by each test that changes it)."""
    d = tmp_path_factory.mktemp("sb") / "run"
    fit_ok(sb(tiny_teacher, d, "run.iterations=2", "run.ckpt_every=1"))
    return d


def copy_run(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_resume_refuses_another_target_teacher_or_changed_setting(sb_run, tiny_teacher, tmp_path, capsys):
    """F5 case 1: ``python launchers/fit.py projects/uni_instruct/config.yaml run.dir=<a SwiftBrush
    run>``, the same with another teacher, and ``python launchers/fit.py projects/swiftbrush/config.yaml
    run.dir=<that run> roles.critic.lr=0.001``: refused, nothing in the run changes;
    ``run.resume_changes=allow`` applies the change (the optimizer's lr too) and keeps both configs."""
    d = copy_run(sb_run, tmp_path / "run")
    before = files(d)
    err = fit_error([UNI, f"module.teacher={tiny_teacher}", f"run.dir={d}", *QUIET, "run.iterations=3"], capsys)
    assert "cannot resume projects.uni_instruct.method.UniInstruct" in err and "written by " \
        "projects.swiftbrush.method.SwiftBrush" in err
    from common.teachers.embedded import build_net, save_weights
    from conftest import TINY_DIT

    torch.manual_seed(1)
    other = tmp_path / "other_teacher.pt"
    save_weights(other, TINY_DIT, build_net(TINY_DIT).state_dict(), {})
    err = fit_error([SB, f"module.teacher={other}", f"run.dir={d}", *QUIET, "run.iterations=3"], capsys)
    assert "trained with another teacher" in err  # (module.teacher differs too, but the hash decides)
    err = fit_error(sb(tiny_teacher, d, "run.iterations=3", "roles.critic.lr=0.001"), capsys)
    assert "with a changed config: roles.critic.lr: 0.0002 -> 0.001" in err and "run.resume_changes=allow" in err
    assert files(d) == before  # refused resumes write nothing
    # allowed: the new lr takes effect from here on (not the optimizer's saved one), both configs kept
    fit_ok(sb(tiny_teacher, d, "run.iterations=3", "roles.critic.lr=0.001", "run.resume_changes=allow"))
    kept = d / "config.until-it0000002.yaml"
    assert "lr: 0.0002" in kept.read_text() and kept.read_text() == before["config.yaml"].decode()
    assert "lr: 0.001\n" in (d / "config.yaml").read_text()
    ck = torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
    lrs = sorted(g["lr"] for o in ck["optimizer_states"] for g in o["param_groups"])
    assert lrs == pytest.approx(sorted([4e-5, 1e-3]))
    assert ck["run_config"]["roles"]["critic"]["lr"] == 0.001
    # more iterations are a resumable change: recorded, no flag needed
    fit_ok(sb(tiny_teacher, d, "run.iterations=4", "roles.critic.lr=0.001", "run.resume_changes=allow"))
    assert (d / "config.until-it0000003.yaml").is_file() and "iterations: 4" in (d / "config.yaml").read_text()


def test_resume_refuses_another_role_set():
    from common.runs import check_resume

    class Module:
        roles = {"student": 0, "teacher": 0}

    cfg = {"module": {"target": "a.B"}, "run": {"dir": "/nonexistent", "resume_changes": "refuse"}}
    ck = {"run_config": cfg, "distill": {"roles": {"student": {}, "teacher": {}, "critic": {}}}}
    from common.config import ConfigError

    with pytest.raises(ConfigError, match=r"it has the roles \['critic', 'student', 'teacher'\], this config "
                                          r"the roles \['student', 'teacher'\]"):
        check_resume(cfg, Path("x.ckpt"), ck, Module())


def test_fresh_start_into_a_run_is_refused_unless_overwrite_moves_it_aside(sb_run, tiny_teacher, tmp_path, capsys):
    """F5 case 2: ``python launchers/fit.py projects/swiftbrush/config.yaml run.dir=<a finished run>
    run.resume=never``: refused; with ``run.overwrite=true`` the old run is moved aside whole, the new
    one has no ``-v1`` files, and the next default run resumes the new one (one history in metrics.csv)."""
    d = copy_run(sb_run, tmp_path / "run")
    before = files(d)
    err = fit_error(sb(tiny_teacher, d, "run.iterations=3", "run.resume=never"), capsys)
    assert f"run.dir {d} already holds a run" in err and "run.overwrite=true" in err
    assert files(d) == before
    fit_ok(sb(tiny_teacher, d, "run.iterations=1", "run.resume=never", "run.overwrite=true", "run.ckpt_every=1"))
    assert files(tmp_path / "run.previous-1") == before
    names = [p.name for p in d.rglob("*")]
    assert not [n for n in names if "-v" in n] and sorted((d / "checkpoints").glob("*.ckpt"))[-1].name == "last.ckpt"
    fit_ok(sb(tiny_teacher, d, "run.iterations=3", "run.ckpt_every=1"))
    steps = [int(r["step"]) for r in rows(d) if r.get("student/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 3  # iterations 0, 1, 2 of the new run only
    assert torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["distill"]["iteration"] == 3


def test_moved_run_resumes_from_its_own_newest_checkpoint(sb_run, tiny_teacher, tmp_path, capsys):
    """A copied directory (file times all new, ``last.ckpt`` older than a periodic one by time) resumes
    from the checkpoint recording the most iterations, inside the copy."""
    d = copy_run(sb_run, tmp_path / "moved")
    import os
    import time

    ck = torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
    ck["distill"]["iteration"], ck["global_step"] = 1, 2  # stands for an older periodic checkpoint
    old = d / "checkpoints" / "it0000001.ckpt"
    torch.save(ck, old)
    os.utime(old, (time.time() + 100, time.time() + 100))  # newest by time, not by progress
    capsys.readouterr()
    fit_ok(sb(tiny_teacher, d, "run.iterations=3"))
    out = capsys.readouterr().out
    assert "resuming at iteration 2" in out
    assert torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["distill"]["iteration"] == 3


def test_periodic_checkpoints_fall_on_iterations_when_steps_per_iteration_change(tiny_teacher, tmp_path):
    """F5 case 3: ``python launchers/fit.py projects/uni_instruct/config.yaml schedule.0.until=1
    run.ckpt_every=2 run.iterations=11`` (one optimizer step in the first iteration, two after it, so
    the step count is odd for ever): a checkpoint at iteration 10."""
    d = tmp_path / "r"
    fit_ok([UNI, f"module.teacher={tiny_teacher}", f"run.dir={d}", *QUIET, "schedule.0.until=1",
            "schedule.1.until=3", "run.ckpt_every=2", "run.iterations=11"])
    ck = torch.load(d / "checkpoints" / "it0000010.ckpt", weights_only=True)
    assert ck["distill"]["iteration"] == 10 and ck["global_step"] == 19  # 1 + 2 * 9


def test_unreadable_newest_checkpoint_falls_back_and_says_so(sb_run, tiny_teacher, tmp_path, capsys):
    """F5 case 6: ``python launchers/fit.py projects/swiftbrush/config.yaml run.dir=<run>`` with a
    truncated ``last.ckpt`` beside an intact periodic one: the resume names both and goes on from the
    intact one; with nothing readable, one error naming every file."""
    d = copy_run(sb_run, tmp_path / "run")
    last = d / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    capsys.readouterr()
    fit_ok(sb(tiny_teacher, d, "run.iterations=3"))
    out = capsys.readouterr().out
    assert f"skipping an unreadable checkpoint ({last}: not a readable checkpoint" in out
    assert f"resuming from {d / 'checkpoints' / 'it0000002.ckpt'} instead" in out
    assert "resuming at iteration 2" in out
    for p in (d / "checkpoints").glob("*.ckpt"):
        p.write_bytes(b"\0" * 100)
    err = fit_error(sb(tiny_teacher, d, "run.iterations=4"), capsys)
    assert f"no readable checkpoint in {d}" in err


def test_sample_and_evaluate_refuse_junk_and_mismatched_checkpoints(sb_run, tiny_teacher, tmp_path, capsys):
    """F5 case 4: ``python launchers/sample.py <run>/checkpoints/junk.ckpt`` (a state dict of only
    ``junk.weight``) and ``python launchers/evaluate.py <SwiftBrush run>/checkpoints/uni.ckpt`` (a
    Uni-Instruct checkpoint beside a SwiftBrush config.yaml): a short error from both launchers."""
    d = copy_run(sb_run, tmp_path / "run")
    junk = d / "checkpoints" / "junk.ckpt"
    torch.save({"state_dict": {"junk.weight": torch.zeros(1)}}, junk)
    uni = tmp_path / "uni"
    fit_ok([UNI, f"module.teacher={tiny_teacher}", f"run.dir={uni}", *QUIET, "run.iterations=1"])
    foreign = d / "checkpoints" / "uni.ckpt"
    foreign.write_bytes((uni / "checkpoints" / "last.ckpt").read_bytes())
    for launcher in (sample_launcher, evaluate_launcher):
        for path, expect in ((junk, "checkpoint does not match SwiftBrush: missing"),
                             (foreign, "was written by projects.uni_instruct.method.UniInstruct, but the run "
                                       "config beside it")):
            capsys.readouterr()
            assert launcher.main([str(path), "--steps", "1", "--num-samples", "10", "--out",
                                  str(tmp_path / "o.json")]) == 2
            errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and expect in errors[0], errors


def test_evaluate_writes_beside_results_json_never_over_it(sb_run, tmp_path, capsys):
    """F5 case 5: ``python launchers/evaluate.py <run>/checkpoints/last.ckpt --steps 1 --num-samples 20``
    leaves the run's results.json as it was and writes a file named by its settings."""
    d = copy_run(sb_run, tmp_path / "run")
    (d / "results.json").write_text('{"the": "final figures"}')
    assert evaluate_launcher.main([str(d / "checkpoints" / "last.ckpt"), "--steps", "1", "--num-samples", "20"]) == 0
    captured = capsys.readouterr()
    assert (d / "results.json").read_text() == '{"the": "final figures"}'
    out = d / "eval" / "last-steps1-n20-nocfg.json"
    assert out.is_file() and '"num_samples": 20' in out.read_text()
    assert "not the protocol's 1000" in captured.err  # small counts are named, not compared silently


BAD_FIT = [  # (config, overrides, the one-line error)
    (SB, ["trainer.log_every_n_steps=abc"], "config key 'trainer.log_every_n_steps' has type str, expected int or None"),
    (SB, ["trainer.max_steps=2.5"], "'trainer.max_steps' is not set by hand"),
    (SB, ["module=3"], "config section 'module' must be a mapping of keys, got 3"),
    (UNI, ["module.preset=nope"], "config key 'module.preset' is 'nope'; expected one of 'rkl', 'fkl'"),
    (SB, ["data.batch_size=0"], "config key 'data.batch_size' must be at least 1, got 0"),
    (SB, ["module.teacher=teacher:nope"], "no embedded teacher"),
    (SB, ["run.resume_changes=maybe"], "'run.resume_changes' is 'maybe'; expected one of 'refuse', 'allow'"),
]


@pytest.mark.parametrize("config,overrides,message", BAD_FIT)
def test_bad_fit_inputs_get_one_line_errors(config, overrides, message, tmp_path, capsys):
    err = fit_error([config, f"run.dir={tmp_path / 'r'}", *QUIET, "run.iterations=1", *overrides], capsys)
    assert message in err, err
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_bad_config_files_get_file_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("module:\n  target: a\n   x: [1\n")
    assert f"error: {bad}:3:5: YAML syntax error: mapping values are not allowed" in fit_error([bad], capsys)
    interp = tmp_path / "interp.yaml"
    interp.write_text(f"base: {ROOT / SB}\nmodule:\n  guidance: ${{nope}}\n")
    assert "Interpolation key 'nope' not found" in fit_error([interp], capsys)


@pytest.mark.parametrize("argv,message", [
    (["teacher:mnist", "--steps", "0"], "--steps must be at least 1, got 0"),
    (["teacher:mnist", "--num-samples", "0"], "--num-samples must be at least 10, got 0"),
    (["teacher:mnist", "--num-samples", "-5"], "--num-samples must be at least 10, got -5"),
    (["teacher:mnist", "--num-samples", "1"], "--num-samples must be at least 10, got 1"),
    (["teacher:mnist", "--dataset", "nope"], "no evaluation protocol for data set 'nope'"),
    (["teacher:nope"], "no embedded teacher 'nope' (embedded: mnist, 8gaussians, checkerboard)"),
    (["teacher:mnist", "--times", "0.5,0.8"], "sampling times must be strictly decreasing"),
])
def test_bad_evaluate_arguments_get_one_line_errors(argv, message, capsys):
    assert evaluate_launcher.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err, err


def test_untrusted_files_are_refused_never_unpickled(tmp_path, capsys):
    """Random bytes and a checkpoint carrying a pickled callable: a short refusal, never torch's advice
    to retry with ``weights_only=False``; the callable does not run."""
    import os

    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"net": {}, "state_dict": {}, "x": Evil()}, evil)
    for path, expect in ((noise, "not a readable checkpoint"), (evil, "refused, it holds objects other than tensors")):
        capsys.readouterr()
        assert sample_launcher.main([str(path), "--steps", "1"]) == 2
        err = capsys.readouterr().err
        assert expect in err and "weights_only=False" not in err, err
    assert not marker.exists()


def test_data_problems_name_their_shard_and_sample(tmp_path, monkeypatch, caplog):
    """A 28x28 image inside 32x32 shards and a label of 42: skipped with a warning naming shard and
    sample; a damaged embedded cache is moved aside and rebuilt; ``FEWSTEP_CACHE=`` is an error."""
    import logging

    import numpy as np

    from common.data import embedded
    from common.data.shards import encode_png, write_shards

    rng = np.random.default_rng(0)
    samples = [{"__key__": f"s{i:03d}", "png": encode_png(rng.integers(0, 255, (32, 32), dtype=np.uint8)),
                "cls": str(i % 10).encode()} for i in range(12)]
    samples[3]["png"] = encode_png(np.zeros((28, 28), np.uint8))
    samples[5]["cls"] = b"42"
    shard = write_shards(tmp_path / "set", "mnist-train", samples)[0]
    with caplog.at_level(logging.WARNING):
        x, y = embedded.load_tensors("mnist", "train", str(tmp_path / "set"))
    assert x.shape == (10, 1, 32, 32) and int(y.max()) < 10
    assert f"shard {shard}: sample 's003' is corrupt (image has shape (28, 28), the set's samples (32, 32))" \
        in caplog.text
    assert f"shard {shard}: sample 's005' is corrupt (label: label 42 is outside the 10 classes)" in caplog.text
    monkeypatch.setenv("FEWSTEP_CACHE", "")
    with pytest.raises(ValueError, match="FEWSTEP_CACHE is set but empty"):
        embedded.cache_root()
    cache = tmp_path / "cache"  # a cache of its own: built here, then damaged
    monkeypatch.setenv("FEWSTEP_CACHE", str(cache))
    embedded._load.cache_clear()
    good, _ = embedded.load_tensors("8gaussians", "heldout")
    shards = sorted((cache / "toy2d").glob("8gaussians-heldout-*.tar"))
    assert shards
    for p in shards:
        p.write_bytes(b"garbage" * 500)
    embedded._load.cache_clear()
    with caplog.at_level(logging.WARNING):
        again, _ = embedded.load_tensors("8gaussians", "heldout")
    assert "is damaged" in caplog.text and (cache / "toy2d.broken").is_dir()
    torch.testing.assert_close(again, good, rtol=0, atol=0)  # rebuilt exactly
    embedded._load.cache_clear()


def test_skipped_nonfinite_step_logs_no_gradient_norm(tiny_teacher, tmp_path, monkeypatch):
    """The skipped step's row has a NaN gradient norm, not the previous step's."""
    from common.module import DistillationModule

    original = DistillationModule._optimize

    def poisoned(self, name, ctx, batch):
        if self.iteration == 1 and name == "student":
            loss_fn = self.loss_student

            def nan_loss(b, c):
                step = loss_fn(b, c)
                step.loss = step.loss * float("nan")
                return step

            monkeypatch.setattr(self, "loss_student", nan_loss)
            try:
                return original(self, name, ctx, batch)
            finally:
                monkeypatch.setattr(self, "loss_student", loss_fn)
        return original(self, name, ctx, batch)

    monkeypatch.setattr(DistillationModule, "_optimize", poisoned)
    d = tmp_path / "r"
    fit_ok(sb(tiny_teacher, d, "run.iterations=3"))
    norms = [float(r["student/grad_norm"]) for r in rows(d) if r.get("student/grad_norm")]
    assert len(norms) == 3 and norms[1] != norms[1] and norms[0] == norms[0] and norms[2] == norms[2]


def test_no_command_deletes_what_a_run_wrote(sb_run, tiny_teacher, tmp_path, capsys):
    """The cases above in one run directory, in turn (a refused change, a refused fresh start, an
    evaluation, a resume with more iterations, an overwrite): after each, every file written before
    still exists, in the run or in the place it was moved to (``<dir>.previous-1``)."""
    d = copy_run(sb_run, tmp_path / "run")
    seen: set[str] = set()

    def check():
        for name in seen:
            assert (d / name).exists() or (tmp_path / "run.previous-1" / name).exists(), name
        seen.update(files(d))

    check()
    fit_error(sb(tiny_teacher, d, "run.iterations=3", "roles.student.lr=1.0"), capsys)
    check()
    fit_error(sb(tiny_teacher, d, "run.iterations=3", "run.resume=never"), capsys)
    check()
    assert evaluate_launcher.main([str(d / "checkpoints" / "last.ckpt"), "--steps", "1", "--num-samples", "10"]) == 0
    check()
    fit_ok(sb(tiny_teacher, d, "run.iterations=3", "run.ckpt_every=1"))
    check()
    assert {"checkpoints/it0000002.ckpt", "checkpoints/it0000003.ckpt", "config.until-it0000002.yaml"} <= seen
    fit_ok(sb(tiny_teacher, d, "run.iterations=1", "run.resume=never", "run.overwrite=true"))
    check()
    assert (tmp_path / "run.previous-1" / "eval").is_dir()


# ---------------------------------------------------------------- kills
FAULT_ARGS = ["trainer.val_check_interval=2", "validation.steps=[1]", "validation.num_samples=20",
              "validation.final_seeds=[0]", "run.ckpt_every=2"]


def _killed(fault: str, at: int, args: list[str]) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "tests/fault_worker.py", fault, str(at), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, (fault, at, p.returncode, p.stderr[-2000:])
    return p


def test_sigkill_at_three_random_points_resumes_exactly(tiny_teacher, tmp_path):
    """A real fit killed with SIGKILL during a step, during a checkpoint write and during validation
    (at random iterations, printed), resumed with ``run.resume=auto`` each time: the same losses, EMA
    weights and metrics.csv as an uninterrupted run, and no earlier file lost."""
    end = 8
    base = [SB, f"module.teacher={tiny_teacher}", *QUIET, *FAULT_ARGS, f"run.iterations={end}"]
    base = [a for a in base if a != "validation.steps=[]"]
    full, part = tmp_path / "full", tmp_path / "part"
    fit_ok([*base, f"run.dir={full}"])
    # checkpoints and validations at even iterations; each kill falls after the point the previous
    # one resumes from (the newest intact checkpoint), so each run gets there
    rnd = random.Random(int(__import__("os").environ.get("FAULT_SEED", random.randrange(1 << 30))))
    step = rnd.randint(1, 3)
    ckpt = rnd.choice([i for i in (4, 6) if i > step])
    val = rnd.choice([i for i in (2, 4, 6, 8) if i >= ckpt - 2 + 2])
    plan = [("step", step), ("checkpoint", ckpt), ("validation", val)]
    print("kill plan (fault, iteration):", plan)
    for fault, at in plan:
        _killed(fault, at, [*base, f"run.dir={part}"])
    fit_ok([*base, f"run.dir={part}"])
    a, b = rows(full), rows(part)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k, v in ra.items():
            if v and k != "epoch":
                assert float(rb[k]) == pytest.approx(float(v), rel=1e-6, abs=1e-7), (ra["step"], k)
    ea = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    eb = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert [k for k in ea if k.startswith("ema.")]
    for k in ea:
        if k.startswith("ema."):
            torch.testing.assert_close(eb[k], ea[k], rtol=0, atol=1e-7)
