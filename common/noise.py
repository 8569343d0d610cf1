"""Time conventions and parameterisation conversions (papers/README.md sections 1-2).

Every forward process here is affine in the clean sample, ``x = a * x0 + b * eps`` with
``eps ~ N(0, I)``. A convention maps its own time variable to ``(a, b)``; a
:class:`NoiseLevel` carries ``(a, b)`` and the convention's data scale, so that two
conventions are matched by log-SNR measured in the same data units ``y = x0 / data_scale``
(TrigFlow with sigma_d has ``x0 = sigma_d * y``; every other convention defaults to 1).

Prediction kinds (all affine in each other at fixed ``(x, a, b)``):

=========  =====================================================  ====================
kind       target                                                 used by
=========  =====================================================  ====================
x0         the clean sample (EDM's ``D(x; sigma)`` is the same)   EDM, students
eps        the noise                                              DDPM teachers
v          ``a * eps - b * x0`` (VP, a^2 + b^2 = 1)               SD2.1, BOOT
flow       ``u = eps - x0`` (rectified flow velocity)             SANA, SD3, Wan, ours
rflow      ``x0 - eps = -u`` (RectifiedFlow codebase, t=1 data)   SlimFlow
trigflow   ``F = cos t * eps - sin t * x0 / sigma_d``             SANA-Sprint, rCM
=========  =====================================================  ====================
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

PREDICTION_KINDS = ("x0", "eps", "v", "flow", "rflow", "trigflow")


def append_dims(t: Tensor | float, ndim: int) -> Tensor | float:
    """Right-pad a per-sample tensor of shape (B,) with singleton dims up to ``ndim``."""
    if not isinstance(t, Tensor) or t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


@dataclass(frozen=True)
class NoiseLevel:
    """``x = a * x0 + b * eps`` where ``x0 = data_scale * y`` and y are data in common units."""

    a: Tensor
    b: Tensor
    data_scale: float = 1.0

    @property
    def logsnr(self) -> Tensor:
        """log-SNR of the data in common units y: ``log((a * data_scale)^2 / b^2)``."""
        return 2 * (torch.log(self.a * self.data_scale) - torch.log(self.b))

    def expand(self, ndim: int) -> "NoiseLevel":
        return NoiseLevel(append_dims(self.a, ndim), append_dims(self.b, ndim), self.data_scale)


def _as_tensor(t) -> Tensor:
    return t if isinstance(t, Tensor) else torch.as_tensor(t, dtype=torch.float64)


class Convention:
    """A time variable and its map to ``(a, b)``. Subclasses name their data and noise ends."""

    name: str = ""
    data_scale: float = 1.0
    t_data: float  # time at the data end
    t_noise: float  # time at the noise end

    def coeffs(self, t) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def _t_from_raw_logsnr(self, raw: Tensor) -> Tensor:
        """Invert ``raw = 2 log(a / b)`` (log-SNR in the convention's own data units)."""
        raise NotImplementedError

    def t_from_logsnr(self, logsnr: Tensor) -> Tensor:
        """The time whose log-SNR in common units ``y = x0 / data_scale`` is ``logsnr``."""
        return self._t_from_raw_logsnr(logsnr - 2 * math.log(self.data_scale))

    def level(self, t) -> NoiseLevel:
        a, b = self.coeffs(_as_tensor(t))
        return NoiseLevel(a, b, self.data_scale)

    def add_noise(self, x0: Tensor, eps: Tensor, t) -> Tensor:
        lv = self.level(t).expand(x0.ndim)
        return lv.a * x0 + lv.b * eps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(data_scale={self.data_scale})"


class RectifiedFlow(Convention):
    """``x_s = (1 - s) x0 + s eps``, s in [0, 1]; s=0 data, s=1 noise."""

    name = "flow"
    t_data, t_noise = 0.0, 1.0

    def __init__(self, data_scale: float = 1.0):
        self.data_scale = data_scale

    def coeffs(self, s):
        return 1 - s, s

    def _t_from_raw_logsnr(self, raw):
        return torch.sigmoid(-raw / 2)  # (1 - s) / s = exp(raw / 2)


class ReversedFlow(Convention):
    """RectifiedFlow codebase: ``x_t = t x1 + (1 - t) z``; t=1 data, t=0 noise (s = 1 - t)."""

    name = "rflow"
    t_data, t_noise = 1.0, 0.0

    def __init__(self, data_scale: float = 1.0):
        self.data_scale = data_scale

    def coeffs(self, t):
        return t, 1 - t

    def _t_from_raw_logsnr(self, raw):
        return torch.sigmoid(raw / 2)


class EDM(Convention):
    """VE / EDM: ``x = x0 + sigma eps``; the time variable is sigma itself."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, data_scale: float = 1.0):
        self.sigma_min, self.sigma_max, self.data_scale = sigma_min, sigma_max, data_scale
        self.t_data, self.t_noise = sigma_min, sigma_max

    def coeffs(self, sigma):
        return torch.ones_like(sigma), sigma

    def _t_from_raw_logsnr(self, raw):
        return torch.exp(-raw / 2)


class ContinuousVP(Convention):
    """``x_t = alpha_t x0 + sigma_t eps`` with the cosine schedule alpha = cos(pi t / 2)."""

    name = "vp"
    t_data, t_noise = 0.0, 1.0

    def __init__(self, data_scale: float = 1.0):
        self.data_scale = data_scale

    def coeffs(self, t):
        return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)

    def _t_from_raw_logsnr(self, raw):
        return torch.atan(torch.exp(-raw / 2)) * 2 / math.pi


class DiscreteVP(Convention):
    """DDPM: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``, t in {0..T-1}; t=0 data.

    Fractional t interpolates log-SNR linearly between integer steps, so SNR matching
    from another convention is exact and invertible.
    """

    name = "ddpm"

    def __init__(self, num_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 schedule: str = "scaled_linear", data_scale: float = 1.0):
        if schedule == "scaled_linear":  # Stable Diffusion
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
        elif schedule == "linear":  # DDPM
            betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        else:
            raise ValueError(f"unknown beta schedule {schedule!r}; expected 'scaled_linear' or 'linear'")
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self._logsnr = torch.log(self.alphas_cumprod / (1 - self.alphas_cumprod))  # decreasing in t
        self.num_steps, self.data_scale = num_steps, data_scale
        self.t_data, self.t_noise = 0.0, float(num_steps - 1)

    def _table_logsnr(self, t: Tensor) -> Tensor:
        t = t.to(torch.float64).clamp(0, self.num_steps - 1)
        lo = t.floor().long().clamp(max=self.num_steps - 2)
        w = t - lo
        table = self._logsnr.to(t.device)
        return table[lo] * (1 - w) + table[lo + 1] * w

    def coeffs(self, t):
        lam = self._table_logsnr(t)
        dtype = t.dtype if t.is_floating_point() else torch.float64
        return torch.sigmoid(lam).sqrt().to(dtype), torch.sigmoid(-lam).sqrt().to(dtype)

    def _t_from_raw_logsnr(self, raw):
        table = self._logsnr.to(raw.device)
        lam = raw.to(torch.float64).clamp(table[-1], table[0])
        # table is decreasing: search on its negation
        hi = torch.searchsorted(-table, -lam).clamp(1, self.num_steps - 1)
        lo = hi - 1
        w = (table[lo] - lam) / (table[lo] - table[hi])
        return (lo + w).to(raw.dtype)


class TrigFlow(Convention):
    """``x_t = cos t x0 + sin t z``, ``z ~ N(0, sigma_d^2 I)``, t in [0, pi/2]; data std sigma_d."""

    name = "trigflow"
    t_data, t_noise = 0.0, math.pi / 2

    def __init__(self, sigma_d: float = 0.5):
        self.sigma_d = self.data_scale = sigma_d

    def coeffs(self, t):
        # float32's pi/2 lies above pi/2, where cos t < 0 and the log-SNR is NaN: clamp to the range
        t = t.clamp(0.0, math.pi / 2)
        return torch.cos(t), self.sigma_d * torch.sin(t)

    def _t_from_raw_logsnr(self, raw):
        return torch.atan(torch.exp(-raw / 2) / self.sigma_d)  # a / b = cot t / sigma_d


def match_time(t, src: Convention, dst: Convention) -> Tensor:
    """The time in ``dst`` with the same log-SNR (in common data units) as ``t`` in ``src``."""
    return dst.t_from_logsnr(src.level(t).logsnr)


def convert_sample(x: Tensor, t, src: Convention, dst: Convention) -> tuple[Tensor, Tensor]:
    """Map a noisy sample and its time from ``src`` to ``dst`` at equal SNR: ``x_dst = (b_dst / b_src) x_src``.

    The data part is then ``a_dst * x0_dst`` with ``x0_dst = (data_scale_dst / data_scale_src) x0_src``.
    """
    t_dst = match_time(t, src, dst)
    b_src = src.level(t).expand(x.ndim).b
    b_dst = dst.level(t_dst).expand(x.ndim).b
    return (b_dst / b_src).to(x.dtype) * x, t_dst


# ---------------------------------------------------------------- parameterisations


def _coeffs_like(level: NoiseLevel, x: Tensor):
    lv = level.expand(x.ndim)
    return tuple(c.to(x.dtype) if isinstance(c, Tensor) else c for c in (lv.a, lv.b))


def _check_trig(kind: str, level: NoiseLevel) -> None:
    """v needs a^2 + b^2 = 1 and trigflow needs a^2 + (b / data_scale)^2 = 1 (cos t, sigma_d sin t)."""
    ds = 1.0 if kind == "v" else level.data_scale
    dev = (torch.as_tensor(level.a) ** 2 + (torch.as_tensor(level.b) / ds) ** 2 - 1).abs().max()
    if dev > 1e-3:
        raise ValueError(f"prediction kind {kind!r} needs a variance-preserving level "
                         f"(a^2 + (b/{ds})^2 = 1); this one is off by {float(dev):.3g}")


def to_x0_eps(kind: str, pred: Tensor, x: Tensor, level: NoiseLevel) -> tuple[Tensor, Tensor]:
    """Convert a prediction of ``kind`` at ``(x, level)`` to ``(x0_hat, eps_hat)``."""
    if kind in ("v", "trigflow"):
        _check_trig(kind, level)
    a, b = _coeffs_like(level, x)
    ds2 = level.data_scale**2
    if kind == "x0":
        x0 = pred
        eps = (x - a * x0) / b
    elif kind == "eps":
        eps = pred
        x0 = (x - b * eps) / a
    elif kind == "v":  # VP: a^2 + b^2 = 1
        x0 = a * x - b * pred
        eps = b * x + a * pred
    elif kind in ("flow", "rflow"):  # u = eps - x0; for a + b = 1: x0 = x - s u, eps = x + (1 - s) u
        u = pred if kind == "flow" else -pred
        x0 = (x - b * u) / (a + b)
        eps = (x + a * u) / (a + b)
    elif kind == "trigflow":  # F = a eps - (b / ds^2) x0, with a = cos t, b = ds sin t
        x0 = a * x - b * pred
        eps = (b * x + a * ds2 * pred) / ds2
    else:
        raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTION_KINDS}")
    return x0, eps


def from_x0_eps(kind: str, x0: Tensor, eps: Tensor, level: NoiseLevel) -> Tensor:
    """The prediction of ``kind`` whose target is given by ``(x0, eps)`` at ``level``."""
    if kind in ("v", "trigflow"):
        _check_trig(kind, level)
    a, b = _coeffs_like(level, x0)
    if kind == "x0":
        return x0
    if kind == "eps":
        return eps
    if kind == "v":
        return a * eps - b * x0
    if kind == "flow":
        return eps - x0
    if kind == "rflow":
        return x0 - eps
    if kind == "trigflow":
        return a * eps - b * x0 / level.data_scale**2
    raise ValueError(f"unknown prediction kind {kind!r}; expected one of {PREDICTION_KINDS}")


def convert_prediction(pred: Tensor, src_kind: str, dst_kind: str, x: Tensor, level: NoiseLevel) -> Tensor:
    """Re-express a prediction at ``(x, level)`` in another parameterisation."""
    if src_kind == dst_kind:
        return pred
    x0, eps = to_x0_eps(src_kind, pred, x, level)
    return from_x0_eps(dst_kind, x0, eps, level)


def score(x0_hat: Tensor, x: Tensor, level: NoiseLevel) -> Tensor:
    """``grad log p(x) = (a x0_hat - x) / b^2``."""
    lv = level.expand(x.ndim)
    return (lv.a * x0_hat - x) / lv.b**2


def flow_to_trigflow_input(x_t: Tensor, t: Tensor, sigma_d: float) -> tuple[Tensor, Tensor]:
    """TrigFlow sample ``(x_t, t)`` -> input ``(x_flow, s)`` of a flow model trained on ``y = x0 / sigma_d``."""
    tt = append_dims(t, x_t.ndim)
    s = torch.sin(t) / (torch.sin(t) + torch.cos(t))
    return x_t / sigma_d / (torch.cos(tt) + torch.sin(tt)), s


def flow_velocity_to_trigflow(u: Tensor, x_flow: Tensor, s: Tensor) -> Tensor:
    """``F = (1 - 2s) x_flow / n + n u`` with ``n = sqrt(s^2 + (1 - s)^2)`` (papers/README.md section 2)."""
    ss = append_dims(s, u.ndim)
    n = torch.sqrt(ss**2 + (1 - ss) ** 2)
    return (1 - 2 * ss) * x_flow / n + n * u
