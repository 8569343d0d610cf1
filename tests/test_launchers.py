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


def test_unknown_key_wrong_type_and_missing_checkpoint_are_named_errors(tmp_path):
    p = run("launchers/fit.py", TOY, "module.learning_rate=1e-3", "--dry-run")
    assert p.returncode == 2
    assert "unknown config key 'module.learning_rate'" in p.stderr and "accepts:" in p.stderr
    p = run("launchers/fit.py", TOY, "data.batch_size=big", "--dry-run")
    assert p.returncode == 2 and "config key 'data.batch_size' has type str, expected int" in p.stderr
    p = run("launchers/fit.py", TOY, "trainer.max_stepz=3", "--dry-run")
    assert p.returncode == 2 and "unknown config key 'trainer.max_stepz'" in p.stderr
    p = run("launchers/fit.py", TOY, "bogus.x=1", "--dry-run")
    assert p.returncode == 2 and "unknown config key 'bogus.x'" in p.stderr
    missing = tmp_path / "nope.ckpt"
    p = run("launchers/fit.py", TOY, f"run.resume={missing}", f"run.dir={tmp_path / 'r'}")
    assert p.returncode == 2 and f"run.resume: checkpoint not found: {missing}" in p.stderr
    p = run("launchers/sample.py", str(missing))
    assert p.returncode == 2 and f"checkpoint not found: {missing}" in p.stderr
    p = run("launchers/evaluate.py", str(missing))
    assert p.returncode == 2 and f"checkpoint not found: {missing}" in p.stderr


def test_dry_run_prints_the_resolved_config():
    p = run("launchers/fit.py", TOY, "module.lr=0.01", "--dry-run", check=True)
    assert "lr: 0.01" in p.stdout
    # YAML 1.1 reads 1e-4 as a string; where a float is expected it is the float
    assert "lr: 0.0001" in run("launchers/fit.py", TOY, "module.lr=1e-4", "--dry-run", check=True).stdout
    assert "logit_std: 1.0" in p.stdout  # a default filled in from the signature
    assert "dir: runs/teacher/toy_8gaussians" in p.stdout


def _losses(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_fit_writes_a_run_and_resumes_exactly(tmp_path):
    common = ["trainer.log_every_n_steps=1", "trainer.val_check_interval=10", "module.num_samples=200",
              "module.sample_steps=4", "data.batch_size=64", "run.ckpt_every_n_steps=10"]
    full, part = tmp_path / "full", tmp_path / "part"
    run("launchers/fit.py", TOY, *common, "trainer.max_steps=20", f"run.dir={full}", check=True)
    # the same run stopped at step 10, then resumed from its last checkpoint to step 20
    run("launchers/fit.py", TOY, *common, "trainer.max_steps=10", f"run.dir={part}", check=True)
    assert (part / "checkpoints" / "last.ckpt").is_file()
    p = run("launchers/fit.py", TOY, *common, "trainer.max_steps=20", f"run.dir={part}", check=True)
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
    assert (full / "config.yaml").read_text().count("max_steps: 20") == 1
    assert (full / "toy_8gaussians_mlp.pt").is_file()  # run.export, inside the run directory
    assert sorted(p.name for p in (full / "samples").glob("*.png")) == ["step0000010.png", "step0000020.png"]
    # the exported EMA teacher samples, through sample.py
    out = tmp_path / "s"
    run("launchers/sample.py", str(full / "toy_8gaussians_mlp.pt"), "--steps", "4", "--out", str(out), check=True)
    assert out.with_suffix(".png").stat().st_size > 1000
    import numpy as np

    pts = np.load(out.with_suffix(".npz"))["points"]
    assert pts.shape == (100, 2) and np.isfinite(pts).all()
