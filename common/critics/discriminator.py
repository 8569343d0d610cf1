"""Discriminator heads on intermediate features of a frozen or trained network (LADD, DMD2,
Uni-Instruct's density ratio).

* :class:`FeatureHooks` collects the outputs of named submodules during one forward (any network:
  a DiT block, a diffusers UNet's mid block).
* :class:`Discriminator` puts one small head on each hooked feature: tokens ``(B, N, D)`` or maps
  ``(B, C, H, W)`` give a logit per position, ``(B, N)``, or with ``pool`` one per sample from the mean
  token; the heads' logits are concatenated along the positions.
* :func:`discriminator_loss` / :func:`generator_loss`: ``hinge`` or ``ns`` (non-saturating, i.e. the
  logistic loss), per sample (the mean over positions).
* :func:`auc`: how well scores separate real from generated samples (0.5: not at all).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GanLoss = Literal["hinge", "ns"]


class FeatureHooks:
    """``with FeatureHooks(net, ["blocks.3"]) as feats: net(x)`` leaves ``feats["blocks.3"]``."""

    def __init__(self, net: nn.Module, names: list[str]):
        self.modules = {n: net.get_submodule(n) for n in names}
        self.features: dict[str, Tensor] = {}
        self._handles = []

    def __enter__(self) -> dict[str, Tensor]:
        self.features.clear()
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(
                lambda _m, _inp, out, name=name: self.features.__setitem__(name, out[0] if isinstance(out, tuple)
                                                                           else out)))
        return self.features

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()


class Head(nn.Module):
    """Logits from one feature: LayerNorm, then an MLP (two hidden SiLU layers) on each token (or pixel of
    a map), a logit per position, ``(B, N)``; or with ``pool`` on the mean token, one logit per sample,
    ``(B, 1)``: a global head, which sees the whole image where per-position logits average local
    evidence (much the stronger of the two on the embedded benchmark, projects/uni_instruct/README.md).
    The last layer starts at zero, so a new head says 0 (D = 1/2, ratio 1) everywhere."""

    def __init__(self, dim: int, hidden: int | None = None, pool: bool = False):
        super().__init__()
        hidden, self.pool = hidden or dim, pool
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, f: Tensor) -> Tensor:
        if f.ndim == 4:  # (B, C, H, W) -> (B, HW, C)
            f = f.flatten(2).transpose(1, 2)
        if f.ndim != 3:
            raise ValueError(f"a discriminator head takes tokens (B, N, D) or maps (B, C, H, W), got {tuple(f.shape)}")
        if self.pool:
            f = f.mean(1, keepdim=True)
        return self.net(f).squeeze(-1)


class Discriminator(nn.Module):
    """One :class:`Head` per named feature; ``forward(features)`` returns the logits ``(B, sum N)``
    (``(B, number of features)`` with ``pool``)."""

    def __init__(self, dims: dict[str, int], hidden: int | None = None, pool: bool = False):
        super().__init__()
        self.names = list(dims)
        self.heads = nn.ModuleList(Head(d, hidden, pool) for d in dims.values())

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        missing = [n for n in self.names if n not in features]
        if missing:
            raise KeyError(f"discriminator features {missing} were not produced (have {sorted(features)})")
        return torch.cat([h(features[n]) for n, h in zip(self.names, self.heads)], dim=1)


def discriminator_loss(logit_real: Tensor, logit_fake: Tensor, kind: GanLoss = "ns") -> Tensor:
    """Per sample: ``hinge``: ``relu(1 - l_real) + relu(1 + l_fake)``; ``ns``: ``softplus(-l_real) +
    softplus(l_fake)`` (the logistic loss, BCE with real = 1), each the mean over positions."""
    if kind == "hinge":
        return F.relu(1 - logit_real).flatten(1).mean(1) + F.relu(1 + logit_fake).flatten(1).mean(1)
    if kind == "ns":
        return F.softplus(-logit_real).flatten(1).mean(1) + F.softplus(logit_fake).flatten(1).mean(1)
    raise ValueError(f"unknown GAN loss {kind!r}; expected 'hinge' or 'ns'")


def generator_loss(logit_fake: Tensor, kind: GanLoss = "ns") -> Tensor:
    """Per sample: ``hinge``: ``-l_fake``; ``ns``: ``softplus(-l_fake)``, the mean over positions."""
    if kind == "hinge":
        return -logit_fake.flatten(1).mean(1)
    if kind == "ns":
        return F.softplus(-logit_fake).flatten(1).mean(1)
    raise ValueError(f"unknown GAN loss {kind!r}; expected 'hinge' or 'ns'")


def auc(score_real: Tensor, score_fake: Tensor) -> float:
    """The probability that a real sample scores above a generated one (ties count one half): the area
    under the ROC curve of real vs generated, 0.5 for scores that cannot tell them apart. Every pair is
    compared (fine up to some 10^4 scores a side)."""
    r, f = score_real.flatten().double(), score_fake.flatten().double()
    if not len(r) or not len(f):
        raise ValueError("auc needs at least one real and one generated score")
    return float(((r[:, None] > f[None]).double() + 0.5 * (r[:, None] == f[None]).double()).mean())
