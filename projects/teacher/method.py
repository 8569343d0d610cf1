"""Recipe of the embedded teachers: class-conditional flow matching with label dropout.

Rectified flow ``x_s = (1 - s) x0 + s eps``, the net predicts ``u = eps - x0`` (conditional flow
matching loss ``E ||u_theta(x_s, s, y) - (eps - x0)||^2``); labels are replaced by the null class
with probability ``label_dropout`` so the same net gives the unconditional branch for CFG.
The exported teacher is the EMA of the weights.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Literal
from pathlib import Path

import lightning as L
import torch
from ema_pytorch import EMA

from common.images import save_grid, save_scatter
from common.rng import per_sample
from common.sampling import generate
from common.teachers.denoiser import Guided
from common.teachers.embedded import build_net, flow_denoiser, save_weights


def sample_flow_times(n: int, mode: str, generator: torch.Generator, mean: float = 0.0, std: float = 1.0):
    if mode == "uniform":
        return torch.rand(n, generator=generator)
    if mode == "logit_normal":  # SD3: s = sigmoid(N(mean, std^2))
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator))
    raise ValueError(f"unknown time sampling {mode!r}; expected 'uniform' or 'logit_normal'")


class FlowMatchingTeacher(L.LightningModule):
    def __init__(self, net: dict, label_dropout: float = 0.1, lr: float = 5e-4, weight_decay: float = 0.0,
                 betas: list = (0.9, 0.99), warmup_steps: int = 500, lr_min_ratio: float = 0.1,
                 time_sampling: Literal["uniform", "logit_normal"] = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 ema_beta: float = 0.9995, ema_power: float = 0.75, sample_steps: int = 16,
                 sample_guidance: float = 2.0, num_samples: int = 100, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.net_spec = dict(net)
        self.net = build_net(self.net_spec)
        self.denoiser = flow_denoiser(self.net)
        self.ema = EMA(self.net, beta=ema_beta, power=ema_power, update_after_step=0, update_every=1,
                       include_online_model=False)
        self.batches_seen = 0
        self.train_seconds = 0.0
        self._t0 = None

    # ---------------------------------------------------------------- training
    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(self.net.parameters(), lr=h.lr, betas=tuple(h.betas), weight_decay=h.weight_decay)
        total = max(self.trainer.max_steps, 1)

        def lr_lambda(step):
            if step < h.warmup_steps:
                return (step + 1) / h.warmup_steps
            progress = min(1.0, (step - h.warmup_steps) / max(1, total - h.warmup_steps))
            return h.lr_min_ratio + (1 - h.lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
                                                    "interval": "step"}}

    def training_step(self, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.time()
        x0, y, pos = batch
        h = self.hparams
        # noise, time and label dropout drawn per sample, keyed by its global stream position: any
        # split across ranks, and a resumed run, draw the same numbers
        gens = per_sample(pos, h.seed)
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(x0)
        s = torch.cat([sample_flow_times(1, h.time_sampling, g, h.logit_mean, h.logit_std) for g in gens]).to(x0)
        if self.net.num_classes:
            drop = torch.cat([torch.rand(1, generator=g) for g in gens]) < h.label_dropout
            y = torch.where(drop.to(y.device), torch.full_like(y, self.net.num_classes), y)
        else:  # unconditional (2-D toys)
            y = None
        x_s = self.denoiser.convention.add_noise(x0, eps, s)
        u = self.denoiser(x_s, s, y)
        loss = (u - (eps - x0)).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the global-batch mean under DDP
        self.batches_seen += 1
        return loss

    def optimizer_step(self, *args, **kwargs):
        # EMA right after the optimizer step, inside the step: callbacks' on_train_batch_end (the
        # checkpoint writers) run before the module's, so an EMA update there would miss checkpoints
        super().optimizer_step(*args, **kwargs)
        self.ema.update()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        now = time.time()
        if self._t0 is not None:
            self.train_seconds += now - self._t0
        self._t0 = now

    # ---------------------------------------------------------------- checkpoint state
    def on_save_checkpoint(self, checkpoint):
        checkpoint["batches_seen"] = self.batches_seen
        checkpoint["train_seconds"] = self.train_seconds

    def on_load_checkpoint(self, checkpoint):
        self.batches_seen = checkpoint.get("batches_seen", 0)
        self.train_seconds = checkpoint.get("train_seconds", 0.0)

    # ---------------------------------------------------------------- samples
    sampler = "euler"  # how launchers/sample.py and evaluate.py draw from this module

    def generator_denoiser(self):
        """The network that generates samples (the EMA weights), as a Denoiser."""
        return flow_denoiser(self.ema.ema_model).eval()

    def validation_step(self, batch, batch_idx):
        pass

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking or self.trainer.global_rank != 0:
            return
        h = self.hparams
        den = Guided(self.generator_denoiser(), h.sample_guidance, "standard")
        out = Path(self.trainer.default_root_dir) / "samples"
        if getattr(self.net, "image_size", None):
            shape = (h.num_samples, self.net.in_channels, self.net.image_size, self.net.image_size)
            y = torch.arange(h.num_samples) % self.net.num_classes
            x = generate(den, shape, h.sample_steps, cond=y, seed=h.seed)
            save_grid(x, out / f"step{self.global_step:07d}.png", nrow=self.net.num_classes)
        else:
            x = generate(self.generator_denoiser(), (h.num_samples, self.net.in_dim), h.sample_steps, seed=h.seed)
            save_scatter(x, out / f"step{self.global_step:07d}.png", title=f"step {self.global_step}")

    # ---------------------------------------------------------------- export
    def export(self, path: str) -> None:
        meta = {"recipe": "projects/teacher", "dataset": self.trainer.datamodule.name if self._trainer else None, "batches_seen": self.batches_seen,
                "train_seconds": round(self.train_seconds, 1), "hparams": {k: (list(v) if isinstance(v, tuple) else v)
                                                                           for k, v in dict(self.hparams).items()}}
        save_weights(path, self.net_spec, copy.deepcopy(self.ema.ema_model).state_dict(), meta)
