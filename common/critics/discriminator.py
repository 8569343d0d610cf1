"""Discriminator heads on intermediate features of a frozen or trained network (LADD, DMD2,
Uni-Instruct's density ratio).

* :class:`FeatureHooks` collects the outputs of named submodules during one forward (any network:
  a DiT block, a diffusers UNet's mid block).
* :class:`Discriminator` puts one small head on each hooked feature: tokens ``(B, N, D)`` or maps
  ``(B, C, H, W)`` give a logit per position, ``(B, N)``, or with ``pool`` one per sample from the mean
  token; the heads' logits are concatenated along the positions. ``head="mlp"`` (:class:`Head`, a
  per-token MLP) or ``head="conv"`` (:class:`ConvHead`, SANA-Sprint's / ADD's form: spectral-norm
  1-D convolutions along the token sequence with a local batch norm).
* :func:`discriminator_loss` (:func:`discriminator_halves`) / :func:`generator_loss`: ``hinge`` or ``ns`` (non-saturating, i.e. the
  logistic loss), per sample (the mean over positions).
* :func:`auc`: how well scores separate real from generated samples (0.5: not at all).
"""
from __future__ import annotations

import math
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


def feature_dims(net: nn.Module, names: list[str]) -> dict[str, int]:
    """The width of each named block's features of a teacher-shaped network: the network's own
    ``feature_dims`` (diffusers models, common/teachers/hub.py), else its token width ``dim`` (the
    embedded DiT)."""
    if hasattr(net, "feature_dims"):
        return net.feature_dims(names)
    if getattr(net, "dim", None) is None:
        raise ValueError(f"cannot tell the feature width of {type(net).__name__}")
    return {n: net.dim for n in names}


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
        f = _tokens(f)
        if self.pool:
            f = f.mean(1, keepdim=True)
        return self.net(f).squeeze(-1)


def _tokens(f: Tensor) -> Tensor:
    """A feature as tokens ``(B, N, D)``; maps ``(B, C, H, W)`` become ``(B, HW, C)``."""
    if f.ndim == 4:
        f = f.flatten(2).transpose(1, 2)
    if f.ndim != 3:
        raise ValueError(f"a discriminator head takes tokens (B, N, D) or maps (B, C, H, W), got {tuple(f.shape)}")
    return f


class LocalBatchNorm(nn.Module):
    """Batch norm over groups of ``virtual_batch`` samples (and all positions), per channel, with an
    affine map and no running statistics: the statistics of a batch never mix real and generated
    samples that are fed in separate calls, and a batch of any size works (a last group may be smaller)."""

    def __init__(self, channels: int, virtual_batch: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_batch, self.eps = virtual_batch, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, N)
        out = []
        for g in x.split(self.virtual_batch):
            mean = g.mean(dim=(0, 2), keepdim=True)
            var = g.var(dim=(0, 2), keepdim=True, unbiased=False)
            out.append((g - mean) * torch.rsqrt(var + self.eps))
        return torch.cat(out) * self.weight[:, None] + self.bias[:, None]


class ConvHead(nn.Module):
    """SANA-Sprint's head (papers/sana_sprint.md section 3, ADD's): on the token sequence ``(B, D, N)``,
    a spectral-norm ``Conv1d(k=1)`` block (local batch norm over groups of 8 samples, LeakyReLU 0.2),
    a residual block of the same with ``k=9`` (``(x + f(x)) / sqrt 2``), and a spectral-norm
    ``Conv1d(k=1)`` to one logit per token, ``(B, N)``. (The spectral norm rules out a zero last layer:
    a new head's logits are small, not zero.)"""

    def __init__(self, dim: int, hidden: int | None = None, kernel: int = 9, virtual_batch: int = 8):
        super().__init__()
        hidden = hidden or dim
        sn = nn.utils.parametrizations.spectral_norm

        def block(cin, k):
            return nn.Sequential(sn(nn.Conv1d(cin, hidden, k, padding=k // 2)), LocalBatchNorm(hidden, virtual_batch),
                                 nn.LeakyReLU(0.2))

        self.first, self.res, self.out = block(dim, 1), block(hidden, kernel), sn(nn.Conv1d(hidden, 1, 1))

    def forward(self, f: Tensor) -> Tensor:
        h = self.first(_tokens(f).transpose(1, 2))
        h = (h + self.res(h)) / math.sqrt(2)
        return self.out(h).squeeze(1)


HEADS = ("mlp", "conv")


class Discriminator(nn.Module):
    """One head per named feature (``head``: ``mlp``, :class:`Head`; ``conv``, :class:`ConvHead`, per
    token only); ``forward(features)`` returns the logits ``(B, sum N)`` (``(B, number of features)``
    with ``pool``)."""

    def __init__(self, dims: dict[str, int], hidden: int | None = None, pool: bool = False, head: str = "mlp"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown discriminator head {head!r}; expected one of {list(HEADS)}")
        if head == "conv" and pool:
            raise ValueError("the conv head gives a logit per token: it has no pooled form")
        self.names = list(dims)
        self.heads = nn.ModuleList((Head(d, hidden, pool) if head == "mlp" else ConvHead(d, hidden))
                                   for d in dims.values())

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        missing = [n for n in self.names if n not in features]
        if missing:
            raise KeyError(f"discriminator features {missing} were not produced (have {sorted(features)})")
        return torch.cat([h(features[n]) for n, h in zip(self.names, self.heads)], dim=1)


def discriminator_halves(logit_real: Tensor, logit_fake: Tensor, kind: GanLoss = "ns") -> tuple[Tensor, Tensor]:
    """The real and the fake halves of the discriminator's loss, per sample of each (the two batches may
    differ in size): ``hinge``: ``relu(1 - l_real)``, ``relu(1 + l_fake)``; ``ns``: ``softplus(-l_real)``,
    ``softplus(l_fake)`` (the logistic loss, BCE with real = 1), each the mean over positions."""
    if kind == "hinge":
        return F.relu(1 - logit_real).flatten(1).mean(1), F.relu(1 + logit_fake).flatten(1).mean(1)
    if kind == "ns":
        return F.softplus(-logit_real).flatten(1).mean(1), F.softplus(logit_fake).flatten(1).mean(1)
    raise ValueError(f"unknown GAN loss {kind!r}; expected 'hinge' or 'ns'")


def discriminator_loss(logit_real: Tensor, logit_fake: Tensor, kind: GanLoss = "ns") -> Tensor:
    """Per sample pair, the sum of :func:`discriminator_halves`."""
    real, fake = discriminator_halves(logit_real, logit_fake, kind)
    return real + fake


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
