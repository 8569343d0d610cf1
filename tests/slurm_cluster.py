"""A real single-node SLURM on localhost for the tests (slurm-wlm and munge from Debian packages).

``start_cluster(tmp)`` writes a slurm.conf in ``tmp``, starts munged (if not running), slurmctld
and slurmd on unprivileged ports, waits until the node is idle and returns the environment that
points sbatch/srun at it; ``stop_cluster`` ends the daemons.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def available() -> bool:
    return all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(tmp: Path) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    for d in ("state", "spool", "log"):
        (tmp / d).mkdir(exist_ok=True)
    ctl, node = _free_port(), _free_port()
    cpus = os.cpu_count() or 1
    conf = tmp / "slurm.conf"
    conf.write_text(f"""ClusterName=fewstep
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd.pid
SlurmctldLogFile={tmp}/log/slurmctld.log
SlurmdLogFile={tmp}/log/slurmd.log
SlurmctldPort={ctl}
SlurmdPort={node}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
NodeName={host} CPUs={cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        subprocess.run(["munged", "--force"], check=True, capture_output=True)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
    subprocess.run(["slurmd", "-f", str(conf)], check=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
        if p.stdout.strip() == "idle":
            return env
        time.sleep(1)
    raise RuntimeError(f"the test SLURM node did not come up; see {tmp}/log")


def stop_cluster(tmp: Path) -> None:
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        p = tmp / pid_file
        if p.is_file():
            subprocess.run(["kill", p.read_text().strip()], capture_output=True)


def wait_jobs(env: dict, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        p = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=env)
        if not p.stdout.strip():
            return
        time.sleep(2)
    raise TimeoutError("SLURM jobs still queued or running")


def release_requeued(env: dict, job: str, timeout: float = 120) -> None:
    """Make a requeued ``job`` eligible at once: SLURM holds a requeued job for 120 s (BeginTime) before
    it may start again. Waits for it to be pending, then ``scontrol update StartTime=now`` (the cluster's
    own command: the restart itself is real); returns early if the job is gone."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                               env=env).stdout.strip()
        if state == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, env=env)
            return
        if not state:
            return
        time.sleep(0.5)
