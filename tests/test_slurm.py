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
    args = [sys.executable, "launchers/slurm.py", TOY, "trainer.max_steps=3", "trainer.val_check_interval=3",
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
