"""Build a Lightning Trainer for a resolved run config: run directory, atomic checkpoints, CSV
(and offline wandb) logging, resume."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from common import runs
from common.config import ConfigError, build_module, instantiate
from common.module import DistillationModule
from common.requeue import RequeueOnSignal
from common.serialization import read
from common.validation import Validation, ValidationConfig

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<path>.tmp`` then rename, so a kill mid-save leaves the previous file intact; read
    with ``weights_only=True`` (common/serialization.py), whatever the caller asks."""

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return read(path)

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


class _ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes metrics.csv when the run directory exists. On resume, keep the
    rows logged before the checkpoint's step instead (rows after it are redone by the resumed run)."""

    def __init__(self, log_dir: str, keep_below_step: int | None):
        self._keep = keep_below_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self._keep is None or not os.path.isfile(self.metrics_file_path):
            return super()._check_log_dir_exists()
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if int(r["step"]) < self._keep]
        with open(self.metrics_file_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        self.metrics_keys = sorted(keys)


def iterations_done(trainer, module) -> int:
    """Iterations run so far: a distillation module counts them; a recipe takes one optimizer step each."""
    return module.iteration if isinstance(module, DistillationModule) else trainer.global_step


class IterationProgressBar(TQDMProgressBar):
    """The training bar counts iterations to the end of the run (``run.iterations``); a distillation
    iteration takes one optimizer step per role its schedule names, so ``max_steps`` would not do."""

    def __init__(self, iterations: int, **kw):
        super().__init__(**kw)
        self.iterations = iterations

    @property
    def total_train_batches(self):
        done = iterations_done(self.trainer, self.trainer.lightning_module)
        return min(self.trainer.num_training_batches, self.iterations - done)


def _validates_after_this_batch(trainer) -> bool:
    """Whether Lightning runs the validation loop once the current training batch ends (asked of the
    loop itself, so every validation setting counts the same way it does)."""
    loop = trainer.fit_loop.epoch_loop
    if not trainer.enable_validation or not hasattr(loop, "_should_check_val_fx"):
        return False
    return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


class IterationCheckpoint(ModelCheckpoint):
    """Periodic checkpoints every ``every`` iterations (not optimizer steps, whose count per iteration
    can change between phases), named by iteration (``it0000500.ckpt``) and all kept, plus ``last``;
    also at the run's ``final`` iteration, so ``last`` holds the weights the final figures measure.
    When a validation follows the iteration, the checkpoint is written after it: a kill during the
    validation then resumes before it and measures again, instead of skipping it."""

    def __init__(self, every: int, final: int | None = None, **kw):
        super().__init__(every_n_train_steps=0, **kw)
        self.every, self.final = every, final

    def _monitor_candidates(self, trainer):
        import torch

        out = super()._monitor_candidates(trainer)
        out["iteration"] = torch.tensor(iterations_done(trainer, trainer.lightning_module))
        return out

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        it = iterations_done(trainer, module)
        if (it % self.every and it != self.final) or self._should_skip_saving_checkpoint(trainer):
            return
        if _validates_after_this_batch(trainer):  # checkpoint after it, or a kill during it loses it
            self._deferred = True
            return
        self._save(trainer)

    def on_validation_end(self, trainer, module):
        super().on_validation_end(trainer, module)
        if getattr(self, "_deferred", False):
            self._deferred = False
            self._save(trainer)

    def _save(self, trainer):
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)


class RunLength(Callback):
    """Counts the run in iterations: stops a distillation run after ``iterations`` (a skipped non-finite
    step takes no optimizer step, so ``max_steps`` alone would run on), and prints the batch arithmetic
    at the start."""

    def __init__(self, cfg: dict):
        self.iterations = cfg["run"]["iterations"]
        self.global_batch = cfg["data"].get("batch_size")
        self._counted = False

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        # The log step of an iteration is the number of iterations before it. How Lightning restores its
        # own counter depends on where in its loop the checkpoint was written (after a validation, see
        # IterationCheckpoint, it can be off); set it from what the run has done, once its loop has
        # restarted, so metrics.csv continues exactly where the checkpoint stands.
        if not self._counted:
            trainer.fit_loop.epoch_loop._batches_that_stepped = iterations_done(trainer, module)
            self._counted = True

    def on_fit_start(self, trainer, module):
        world = trainer.world_size
        b = self.global_batch
        if b is not None and b % world:
            raise ConfigError(f"data.batch_size={b} (the global batch) is not divisible by the world size {world}")
        if trainer.global_rank:
            return
        lines = [f"run: {self.iterations} iterations"]
        if b is not None:
            lines.append(f"batch: global {b} = {world} rank(s) x {b // world} per rank; "
                         f"{self.iterations * b:,} samples in all")
        if isinstance(module, DistillationModule):
            sch = module.schedule
            per_role = sch.steps_per_role(self.iterations)
            lines.append(f"optimizer steps: {trainer.max_steps} ("
                         + ", ".join(f"{r} {per_role[r]}" for r in sorted(per_role)) + "); phases: "
                         + ", ".join(f"{p.name} from {sch.start_of(p.name)}" for p in sch.phases))
            if module.iteration:
                lines.append(f"resuming at iteration {module.iteration}")
        print("\n".join(lines), flush=True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if isinstance(module, DistillationModule) and module.iteration >= self.iterations:
            trainer.should_stop = True


def max_steps(cfg: dict, module) -> int:
    """Optimizer steps of ``run.iterations``: one per stepping role for a distillation module (from its
    schedule), one per iteration for a recipe."""
    n = cfg["run"]["iterations"]
    if isinstance(module, DistillationModule):
        sch = module.schedule
        for p in sch.phases[:-1]:
            if p.until >= n:
                log.warning("schedule phase after %r starts at iteration %d, beyond the run's %d iterations",
                            p.name, p.until, n)
        return max(sch.steps_for(n), 1)
    return n


class RunCSVLogger(CSVLogger):
    """metrics.csv directly in the run directory, continued across resumes."""

    def __init__(self, run_dir: str, resume_step: int | None):
        super().__init__(run_dir, name="", version="")
        self._resume_step = resume_step

    @property
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(self.log_dir, self._resume_step)
        return self._experiment


def checkpoint_log_step(ckpt: dict) -> int:
    """The first logging step a resumed run writes: the iterations its checkpoint records (the log
    step of iteration ``i`` is ``i``, see :meth:`RunLength.on_train_batch_start`)."""
    return runs.progress_of(ckpt)[0]


class RunRecord(Callback):
    """Stores the resolved run config in every checkpoint, so a resume can tell what wrote it."""

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def on_save_checkpoint(self, trainer, module, checkpoint):
        checkpoint["run_config"] = self.cfg


def close_process_group() -> None:
    """Destroy the distributed process group, when one was made, while the interpreter is whole.

    Left to interpreter shutdown, gloo's worker threads can outlive what they reference and a rank
    ends with SIGABRT ("terminate called without an active exception") after a finished run; every
    entry point that fits under DDP calls this before it returns."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank leaves while another still writes (rank 0's export and summary)
        dist.destroy_process_group()


def build(cfg: dict):
    """Return (trainer, module, datamodule, ckpt_path) for a resolved config; writes config.yaml."""
    run_dir = Path(cfg["run"]["dir"])
    ckpt, state = runs.prepare(cfg)
    L.seed_everything(cfg["run"]["seed"], workers=True, verbose=False)
    module = build_module(cfg)  # a config the module refuses leaves no run folder behind
    run_dir.mkdir(parents=True, exist_ok=True)
    changes = runs.check_resume(cfg, ckpt, state, module) if ckpt else None
    datamodule = instantiate(cfg["data"])
    loggers = [RunCSVLogger(str(run_dir), checkpoint_log_step(state) if ckpt else None)]
    if cfg["run"]["wandb"]:
        os.environ.setdefault("WANDB_MODE", "offline")
        loggers.append(WandbLogger(save_dir=str(run_dir), offline=True, project="fewstep"))
    trainer_kwargs = dict(cfg["trainer"], max_steps=max_steps(cfg, module))
    callbacks = [
        IterationCheckpoint(cfg["run"]["ckpt_every"], cfg["run"]["iterations"], dirpath=str(run_dir / "checkpoints"),
                            filename="it{iteration:07d}", auto_insert_metric_name=False, save_last=True, save_top_k=-1,  # all kept
                            enable_version_counter=False),  # "last" is one file, never last-v1
        RunLength(cfg),
        RunRecord(cfg),
    ]
    if isinstance(module, DistillationModule):
        callbacks.append(Validation(ValidationConfig(**cfg["validation"]), str(run_dir)))
    if trainer_kwargs.get("enable_progress_bar", True):
        callbacks.append(IterationProgressBar(cfg["run"]["iterations"], refresh_rate=10))
    trainer_kwargs.setdefault("use_distributed_sampler", False)  # the data stream splits ranks itself
    if trainer_kwargs.get("strategy") == "ddp" and isinstance(module, DistillationModule) \
            and len(module.trainable_roles()) > 1:
        # each role's backward leaves the other roles' parameters without gradients
        trainer_kwargs["strategy"] = "ddp_find_unused_parameters_true"
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # requeue at a safe point ourselves (common/requeue.py)
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(RequeueOnSignal(str(run_dir)))
    trainer = L.Trainer(default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks, plugins=plugins,
                        **trainer_kwargs)
    if trainer.global_rank == 0:
        runs.record_config(cfg, changes, runs.progress_of(state)[0] if state else 0)
    return trainer, module, datamodule, str(ckpt) if ckpt else None
