"""Distillation projects resume exactly: a run stopped at an iteration and resumed from its last
checkpoint logs the same per-step losses as an uninterrupted run (F2 acceptance), on the real
embedded MNIST teacher at a tiny batch. Uni-Instruct reads real images, so this also checks that
the data order resumes; its phases (warm-up, SiD, preset + GAN) all occur within the run."""
import csv

import pytest
import torch

from test_launchers import run

COMMON = ["trainer.log_every_n_steps=1", "trainer.val_check_interval=1000", "module.val_steps=[]",
          "run.ckpt_every_n_steps=1000", "data.batch_size=4"]
# (config, extra overrides, optimizer steps at the stop, at the end): every stop is an iteration boundary
CASES = {
    "swiftbrush": ("projects/swiftbrush/config.yaml", [], 6, 12),  # 2 optimizer steps per iteration
    "uni_instruct": ("projects/uni_instruct/config.yaml",
                     ["module.warmup_until=2", "module.sid_until=4"], 6, 12),  # 1, 1, then 2 per iteration
}


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step")]
    keys = [k for k in rows[0] if k.endswith("/loss")]
    return {(int(r["step"]), k): float(r[k]) for r in rows for k in keys if r.get(k)}


@pytest.mark.parametrize("project", sorted(CASES))
def test_stopped_and_resumed_run_logs_the_same_losses(project, tmp_path):
    config, extra, stop, end = CASES[project]
    args = [config, *COMMON, *extra]
    full, part = tmp_path / "full", tmp_path / "part"
    run("launchers/fit.py", *args, f"trainer.max_steps={end}", f"run.dir={full}", check=True)
    run("launchers/fit.py", *args, f"trainer.max_steps={stop}", f"run.dir={part}", check=True)
    p = run("launchers/fit.py", *args, f"trainer.max_steps={end}", f"run.dir={part}", check=True)
    assert "Restoring states from the checkpoint" in p.stdout + p.stderr
    a, b = _rows(full), _rows(part)
    assert {k for _, k in a} >= {"student/loss", "critic/loss"}
    assert sorted(a) == sorted(b) and len(a) > 8
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    ea = torch.load(full / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    eb = torch.load(part / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for k in ea:
        if k.startswith("ema."):
            torch.testing.assert_close(eb[k], ea[k], rtol=0, atol=1e-7)
