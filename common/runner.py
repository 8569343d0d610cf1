"""Build a Lightning Trainer for a resolved run config: run directory, atomic checkpoints, CSV
(and offline wandb) logging, resume."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO

from common.config import ConfigError, instantiate, to_yaml

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to ``<path>.tmp`` then rename, so a kill mid-save leaves the previous file intact."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)


def resume_path(cfg: dict) -> str | None:
    run_dir = Path(cfg["run"]["dir"])
    resume = cfg["run"]["resume"]
    if resume == "never":
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(resume).is_file():
        raise ConfigError(f"run.resume: checkpoint not found: {resume}")
    return resume


def build(cfg: dict):
    """Return (trainer, module, datamodule, ckpt_path) for a resolved config; writes config.yaml."""
    run_dir = Path(cfg["run"]["dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = resume_path(cfg)
    L.seed_everything(cfg["run"]["seed"], workers=True, verbose=False)
    module = instantiate(cfg["module"])
    datamodule = instantiate(cfg["data"])
    loggers = [CSVLogger(str(run_dir), name="", version="")]
    if cfg["run"]["wandb"]:
        os.environ.setdefault("WANDB_MODE", "offline")
        loggers.append(WandbLogger(save_dir=str(run_dir), offline=True, project="fewstep"))
    callbacks = [
        ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), filename="step{step:07d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg["run"]["ckpt_every_n_steps"], save_last=True, save_top_k=1),
        TQDMProgressBar(refresh_rate=10),
    ]
    trainer_kwargs = dict(cfg["trainer"])
    trainer_kwargs.setdefault("use_distributed_sampler", False)  # the data stream splits ranks itself
    trainer = L.Trainer(default_root_dir=str(run_dir), logger=loggers, callbacks=callbacks,
                        plugins=[AtomicCheckpointIO()], **trainer_kwargs)
    if trainer.global_rank == 0:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return trainer, module, datamodule, ckpt
