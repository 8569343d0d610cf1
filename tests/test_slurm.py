"""launchers/slurm.py against a real single-node SLURM started here (skipped with the reason only
where SLURM cannot be installed; under CI=true a missing SLURM is a failure)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import slurm_cluster

ROOT = Path(__file__).resolve().parent.parent
TOY = "projects/teacher/configs/toy_8gaussians.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not slurm_cluster.available():
        if os.environ.get("CI") == "true":
            pytest.fail("SLURM (slurm-wlm, munge) is not installed; .ci/run installs it")
        pytest.skip("SLURM is not installed here (apt-get install slurm-wlm munge)")
    tmp = tmp_path_factory.mktemp("slurm")
    env = slurm_cluster.start_cluster(tmp)
    yield env
    slurm_cluster.stop_cluster(tmp)


def test_dry_run_script_and_bad_array_key():
    p = subprocess.run([sys.executable, "launchers/slurm.py", TOY, "--array", "module.seed=0,1", "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "#SBATCH --ntasks-per-node=1" in p.stdout and "#SBATCH --array=0-1" in p.stdout
    assert "#SBATCH --signal=USR1@90" in p.stdout and "#SBATCH --requeue" in p.stdout
    p = subprocess.run([sys.executable, "launchers/slurm.py", TOY, "--array", "module.sed=0,1", "--dry-run"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 2 and "unknown config key 'module.sed'" in p.stderr


def test_array_job_gives_one_run_directory_per_task(cluster, tmp_path):
    run = tmp_path / "array"
    args = [sys.executable, "launchers/slurm.py", TOY, "run.iterations=3", "trainer.val_check_interval=3",
            "module.num_samples=50", "module.sample_steps=2", "data.batch_size=32", "slurm.cpus_per_task=1",
            f"run.dir={run}", "--array", "module.seed=0,1,2"]
    p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=cluster)
    assert p.returncode == 0, p.stderr
    slurm_cluster.wait_jobs(cluster)
    for seed in range(3):
        d = run / f"seed={seed}"
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["module"]["seed"] == seed and cfg["run"]["dir"] == str(d)
        assert (d / "toy_8gaussians_mlp.pt").is_file() and (d / "checkpoints" / "last.ckpt").is_file()
    logs = list((run / "slurm").glob("*.out"))
    assert len(logs) == 3


def _losses(run_dir):
    import csv

    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


COMMON = ["run.iterations=12", "trainer.val_check_interval=12", "trainer.log_every_n_steps=1",
          "module.num_samples=50", "module.sample_steps=2", "data.batch_size=64", "run.ckpt_every=4"]


def test_two_task_ddp_matches_one_process(cluster, tmp_path):
    """2 tasks (DDP over gloo) with the same global batch log the same losses as 1 process."""
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "launchers/fit.py", TOY, *COMMON, f"run.dir={one}"], cwd=ROOT, check=True,
                   capture_output=True)
    p = subprocess.run([sys.executable, "launchers/slurm.py", TOY, *COMMON, "slurm.ntasks_per_node=2",
                        "slurm.cpus_per_task=1", f"run.dir={two}"], cwd=ROOT, capture_output=True, text=True,
                       env=cluster)
    assert p.returncode == 0, p.stderr
    slurm_cluster.wait_jobs(cluster)
    log = next((two / "slurm").glob("*.out")).read_text(errors="replace")
    assert "world_size: 2" in log or "GLOBAL_RANK: 1" in log, log[-2000:]
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(12))
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5), k


def _role_losses(run_dir):
    import csv

    with open(run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step")]
    return {(int(r["step"]), k): float(r[k]) for r in rows for k in ("student/loss", "critic/loss") if r.get(k)}


def test_two_task_ddp_distillation_matches_one_process(cluster, tmp_path, tiny_teacher):
    """A multi-role method (SwiftBrush: student and critic steps, each its own optimizer) as a 2-task DDP
    job logs the same per-role losses as one process with the same global batch."""
    args = ["projects/swiftbrush/config.yaml", f"module.teacher={tiny_teacher}", "run.iterations=4",
            "data.batch_size=8", "validation.steps=[]", "trainer.log_every_n_steps=1", "run.ckpt_every=100"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "launchers/fit.py", *args, f"run.dir={one}"], cwd=ROOT, check=True,
                   capture_output=True)
    p = subprocess.run([sys.executable, "launchers/slurm.py", *args, "slurm.ntasks_per_node=2",
                        "slurm.cpus_per_task=1", f"run.dir={two}"], cwd=ROOT, capture_output=True, text=True,
                       env=cluster)
    assert p.returncode == 0, p.stderr
    slurm_cluster.wait_jobs(cluster)
    log = next((two / "slurm").glob("*.out")).read_text(errors="replace")
    assert "batch: global 8 = 2 rank(s) x 4 per rank" in log, log[-2000:]
    a, b = _role_losses(one), _role_losses(two)
    assert {k for _, k in a} == {"student/loss", "critic/loss"} and sorted(a) == sorted(b) and len(a) == 8
    for k in a:
        assert b[k] == pytest.approx(a[k], rel=1e-5), k


def test_requeued_job_resumes_and_ends_like_an_uninterrupted_run(cluster, tmp_path):
    import time

    import torch

    ref, run = tmp_path / "ref", tmp_path / "req"
    # batch 1024 and 600 steps: long enough (tens of seconds) that the signal lands mid-run on an idle machine
    steps = ["run.iterations=600", "trainer.val_check_interval=600", "trainer.log_every_n_steps=1",
             "module.num_samples=50", "module.sample_steps=2", "data.batch_size=1024", "run.ckpt_every=50"]
    # the uninterrupted reference runs beside the job (one thread each on the two cores); its output goes to a
    # file, never a pipe nobody reads while it runs
    with open(tmp_path / "ref.log", "w") as log_file:
        ref_fit = subprocess.Popen([sys.executable, "launchers/fit.py", TOY, *steps, f"run.dir={ref}"], cwd=ROOT,
                                   stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    p = subprocess.run([sys.executable, "launchers/slurm.py", TOY, *steps, "slurm.cpus_per_task=1",
                        f"run.dir={run}"], cwd=ROOT, capture_output=True, text=True, env=cluster)
    assert p.returncode == 0, p.stderr
    job = p.stdout.split("submitted job ")[1].split(":")[0]
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.ckpt").is_file():  # step 50 reached: well into the run
        assert time.time() < deadline, "the job never reached its first checkpoint"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", job], check=True, env=cluster)
    slurm_cluster.release_requeued(cluster, job)  # skips SLURM's 120 s hold of a requeued job
    slurm_cluster.wait_jobs(cluster)
    assert ref_fit.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    log = "".join(f.read_text(errors="replace") for f in (run / "slurm").glob("*.out"))
    assert "requeue" in log.lower(), log[-3000:]
    assert list(run.glob("hpc_ckpt_*.ckpt")), "no requeue checkpoint was written"
    a, b = _losses(ref), _losses(run)
    assert sorted(b) == list(range(600))
    for k in (599, 598, 300):
        assert b[k] == pytest.approx(a[k], rel=1e-5), k
    wa = torch.load(ref / "toy_8gaussians_mlp.pt", weights_only=True)["state_dict"]
    wb = torch.load(run / "toy_8gaussians_mlp.pt", weights_only=True)["state_dict"]
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_kill_during_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    """SIGKILL while the atomic checkpoint IO writes a large checkpoint: the last complete one stays."""
    import signal
    import time

    import torch

    path = tmp_path / "last.ckpt"
    script = f"""
import torch, sys
sys.path.insert(0, {str(ROOT)!r})
from common.runner import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({{"step": 1, "w": torch.ones(4)}}, {str(path)!r})
print("first", flush=True)
io.save_checkpoint({{"step": 2, "w": torch.randn(400_000_000 // 4 * 4)}}, {str(path)!r})
print("second", flush=True)
"""
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "first"
    tmp = path.with_name(path.name + ".tmp")
    deadline = time.time() + 60
    while not (tmp.is_file() and tmp.stat().st_size > 0):
        assert time.time() < deadline and p.poll() is None, "the second write never started"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    ck = torch.load(path, weights_only=True)
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.ones(4))
