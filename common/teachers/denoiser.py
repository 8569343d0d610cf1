"""The one Denoiser interface: every teacher, student and critic is called through it.

A Denoiser is called with ``(x, t, cond)`` in its own time convention and returns its raw
prediction; :meth:`Denoiser.predict` converts it to any kind of :data:`common.noise.PREDICTION_KINDS`
through :mod:`common.noise`. The time-embedding scale (``1000 s``, ``999 t``, EDM ``ln(sigma)/4``)
stays inside the wrapper, so methods never see it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from common import noise


@dataclass
class Prediction:
    x0: Tensor
    eps: Tensor


class Denoiser(nn.Module):
    """``net(x, time_scale * t, cond)`` predicting ``prediction`` in ``convention``.

    ``null_label`` is the condition used for the unconditional branch of classifier-free
    guidance when ``cond`` is a label tensor (a learned null class).
    """

    def __init__(self, net: nn.Module, convention: noise.Convention, prediction: str,
                 time_scale: float = 1.0, null_label: int | None = None):
        super().__init__()
        if prediction not in noise.PREDICTION_KINDS:
            raise ValueError(f"unknown prediction kind {prediction!r}; expected one of {noise.PREDICTION_KINDS}")
        self.net, self.convention, self.prediction = net, convention, prediction
        self.time_scale, self.null_label = time_scale, null_label

    def forward(self, x: Tensor, t: Tensor, cond, return_features: list[str] | None = None):
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(x.shape[0])
        return self.net(x, t * self.time_scale, cond, return_features=return_features) if return_features \
            else self.net(x, t * self.time_scale, cond)

    def null_cond(self, cond):
        if isinstance(cond, Tensor) and self.null_label is not None:
            return torch.full_like(cond, self.null_label)
        raise ValueError("this denoiser has no null condition for classifier-free guidance")

    def drop_cond(self, cond, mask: Tensor):
        """``cond`` with the rows where ``mask`` holds replaced by the null condition (label dropout)."""
        null = self.null_cond(cond)
        return torch.where(mask.view(-1, *([1] * (cond.ndim - 1))), null, cond)

    def with_net(self, net: nn.Module, time_scale: float | None = None) -> "Denoiser":
        """The same convention, prediction, time scale (unless ``time_scale`` is given) and null
        condition around another network (a student or critic initialised from this teacher)."""
        return Denoiser(net, self.convention, self.prediction, self.time_scale if time_scale is None else time_scale,
                        self.null_label)

    def level(self, t: Tensor) -> noise.NoiseLevel:
        return self.convention.level(t)

    def predict(self, x: Tensor, t: Tensor, cond, kind: str = "x0") -> Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(x.shape[0])
        return noise.convert_prediction(self(x, t, cond), self.prediction, kind, x, self.level(t))

    def x0_eps(self, x: Tensor, t: Tensor, cond) -> Prediction:
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(x.shape[0])
        return Prediction(*noise.to_x0_eps(self.prediction, self(x, t, cond), x, self.level(t)))


CFGMode = Literal["standard", "offset"]
CFG_MODES = get_args(CFGMode)


def cfg_combine(cond_pred: Tensor, uncond_pred: Tensor, scale: float, mode: str) -> Tensor:
    """Classifier-free guidance, with the convention named explicitly (papers/README.md section 7).

    ``standard``: ``uncond + scale * (cond - uncond)`` (scale 1 = no guidance; SwiftBrush, DMD2, SANA-Sprint).
    ``offset``:   ``cond + scale * (cond - uncond)`` (scale 0 = no guidance; rCM, MDT-dist).
    """
    if mode == "standard":
        return uncond_pred + scale * (cond_pred - uncond_pred)
    if mode == "offset":
        return cond_pred + scale * (cond_pred - uncond_pred)
    raise ValueError(f"unknown CFG mode {mode!r}; expected one of {CFG_MODES}")


class Guided(nn.Module):
    """A Denoiser with classifier-free guidance applied to its raw prediction.

    Conversions between kinds are affine with the same coefficients for both branches, so
    guiding the raw prediction equals guiding x0, eps, v or F.
    """

    def __init__(self, denoiser: Denoiser, scale: float, mode: str = "standard"):
        super().__init__()
        if mode not in CFG_MODES:
            raise ValueError(f"unknown CFG mode {mode!r}; expected one of {CFG_MODES}")
        self.denoiser, self.scale, self.mode = denoiser, scale, mode
        self.convention, self.prediction = denoiser.convention, denoiser.prediction

    @property
    def is_identity(self) -> bool:
        return (self.mode == "standard" and self.scale == 1.0) or (self.mode == "offset" and self.scale == 0.0)

    def forward(self, x: Tensor, t: Tensor, cond):
        if self.is_identity:
            return self.denoiser(x, t, cond)
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(x.shape[0])
        both = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, self.denoiser.null_cond(cond)))
        c, u = both.chunk(2)
        return cfg_combine(c, u, self.scale, self.mode)

    def level(self, t):
        return self.denoiser.level(t)

    predict = Denoiser.predict
    x0_eps = Denoiser.x0_eps


def cat_cond(c, u):
    if isinstance(c, Tensor):
        return torch.cat([c, u])
    if isinstance(c, dict):
        return {k: cat_cond(c[k], u[k]) for k in c}
    raise TypeError(f"cannot batch a condition of type {type(c).__name__}")
