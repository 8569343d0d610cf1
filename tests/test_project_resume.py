"""Distillation projects resume exactly: a run stopped at an iteration and resumed from its last
checkpoint logs the same per-step losses as an uninterrupted run, on a tiny random teacher shaped like
the embedded one. Uni-Instruct reads real images, so this also checks that the data order resumes;
its three named phases (warmup, sid, main) all occur within the run."""
import csv

import pytest
import torch

from common.project_index import projects
from test_launchers import ROOT, run

COMMON = ["trainer.log_every_n_steps=1", "trainer.val_check_interval=1000", "validation.steps=[]",
          "run.ckpt_every=1000", "data.batch_size=4"]
EXTRA = {"uni_instruct": ["schedule.0.until=2", "schedule.1.until=4", "module.feature_block=block3"],
         # the tangent warm-up, then critic and student (with the DMD term) alternating
         "rcm": ["schedule.0.until=1", "schedule.1.until=3", "module.tangent_warmup=2", "schedule.2.cycle=[[critic],[student]]"],
         # the dense phase, then G and D alternating, the tangent warm-up ending inside the run
         "sana_sprint": ["schedule.0.until=2", "module.tangent_warmup=2", "module.disc_blocks=[block1,block3]"],
         # the reward stage from iteration 2 (its reference copied before the stop), the EMA fake score
         "flash_dmd": ["module.rl_mode=step_dpo", "module.rl_start=2", "module.fake_ema=0.9"]}
STOP, END = 3, 6  # iterations


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step")]
    keys = [k for k in rows[0] if k.endswith("/loss")]
    return {(int(r["step"]), k): float(r[k]) for r in rows for k in keys if r.get(k)}


@pytest.mark.parametrize("project", sorted(projects("method")))
def test_stopped_and_resumed_run_logs_the_same_losses(project, tmp_path, tiny_teacher, monkeypatch):
    config = str(projects("method")[project].config)
    args = [config, *COMMON, *EXTRA.get(project, []), f"module.teacher={tiny_teacher}"]
    full, part = tmp_path / "full", tmp_path / "part"
    # the uninterrupted run in this process (no interpreter start); the stopped and resumed one as a user runs it
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT / "launchers"))
    import fit

    assert fit.main([*args, f"run.iterations={END}", f"run.dir={full}"]) == 0
    run("launchers/fit.py", *args, f"run.iterations={STOP}", f"run.dir={part}", check=True)
    p = run("launchers/fit.py", *args, f"run.iterations={END}", f"run.dir={part}", check=True)
    assert "Restoring states from the checkpoint" in p.stdout + p.stderr
    assert f"resuming at iteration {STOP}" in p.stdout
    a, b = _rows(full), _rows(part)
    assert "student/loss" in {k for _, k in a} and len({k for _, k in a}) >= 2  # the student and another role
    assert sorted(a) == sorted(b)
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), key
    ea = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    eb = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)
    assert ea["distill"]["iteration"] == eb["distill"]["iteration"] == END
    assert len(a) == ea["global_step"] >= END  # each optimizer step's loss logged once, at the step it was taken
    for k in ea["state_dict"]:
        if k.startswith("ema."):
            torch.testing.assert_close(eb["state_dict"][k], ea["state_dict"][k], rtol=0, atol=1e-7)
