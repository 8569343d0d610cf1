"""Preemption on SLURM: checkpoint at a safe point, then requeue.

Lightning's own SLURM handler saves from inside the signal handler, wherever the step happens to
be (between an optimizer step and the EMA update, say), so the saved state can be inconsistent.
Here the signal only sets a flag; after the current batch has finished (optimizer steps, EMA,
counters), all ranks agree, the run writes ``hpc_ckpt_<n>.ckpt`` into its directory through the
atomic checkpoint IO, rank 0 requeues the job, and training stops. The requeued job resumes from
the newest checkpoint of the run directory (common/runner.py).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


class RequeueOnSignal(Callback):
    def __init__(self, run_dir: str, sig: signal.Signals = signal.SIGUSR1):
        self.run_dir, self.sig, self.flag = Path(run_dir), sig, False

    def setup(self, trainer, pl_module, stage):
        signal.signal(self.sig, self._handler)

    def _handler(self, signum, frame):
        log.warning("received %s: will checkpoint and requeue after this batch", signal.Signals(signum).name)
        self.flag = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not trainer.strategy.reduce_boolean_decision(self.flag, all=False):
            return
        n = 1 + max([int(p.stem.split("_")[-1]) for p in self.run_dir.glob("hpc_ckpt_*.ckpt")] or [0])
        path = self.run_dir / f"hpc_ckpt_{n}.ckpt"
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        if trainer.global_rank == 0:
            job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID"))
            if os.environ.get("SLURM_ARRAY_TASK_ID"):
                job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
            log.warning("saved %s; requeueing job %s", path, job)
            print(f"requeue: saved {path}, requeueing job {job}", flush=True)
            subprocess.run(["scontrol", "requeue", str(job)], check=False)
