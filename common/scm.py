"""Continuous-time consistency (sCM) in TrigFlow: the pieces SANA-Sprint and rCM share, as pure functions
(papers/README.md sections 5-6, sana_sprint.md section 4, rcm.md sections 4 and 7).

Units: a TrigFlow sample ``x_t = cos t x0 + sin t z``, ``z ~ N(0, sigma_d^2 I)``; a network's output is
``F`` with ``x0_hat = cos t x_t - sigma_d sin t F``, and the probability-flow ODE is
``dx_t/dt = sigma_d F*``. rCM is the case ``sigma_d = 1``. The student's ``F`` is a function
``f(x_t, t)`` (conditioning closed over; for a flow network, the TrigFlow wrapper of
``ConventionAdapter(..., noise.TrigFlow(sigma_d)).predict(..., kind="trigflow")``).

- :func:`tangent` gives ``J = cos t sin t dF/dt`` along the teacher's ODE ("JVP rearrangement"):
  ``jvp`` (forward mode through ``jvp_capable``, so attention takes the F3 tangent kernels), or the
  finite-difference fallbacks ``fd_t`` and ``fd`` (O(h) bias).
- :func:`target` is the sCM target ``g`` with the tangent warm-up in the three named forms,
  :func:`normalise` the per-sample ``g / (||g|| + c)``, :func:`nonfinite_rows` the rows to drop.
- :func:`loss` is ``||F - sg(F) - g||^2`` per sample, summed (rCM) or averaged (SANA-Sprint) over
  elements, optionally with a per-sample weight and SANA-Sprint's adaptive log-variance.
- :func:`student_loss` chains them: the whole sCM student loss of a batch, as both projects take it.
- :func:`dense_phase_end` checks the ``dense`` schedule phase that fits a student with a rescaled
  time input (SANA-Sprint's dense time embedding) to the teacher before sCM starts.
"""
from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import Tensor

from common.kernels.jvp_mode import jvp_capable
from common.noise import append_dims

TangentMode = Literal["jvp", "fd_t", "fd"]
WarmupForm = Literal["paper", "code", "code_v0"]
TANGENT_MODES = ("jvp", "fd_t", "fd")
DENSE_PHASE = "dense"  # the schedule phase that fits the student to its dense time embedding
WARMUP_FORMS = ("paper", "code", "code_v0")


def _cs(t: Tensor, ndim: int) -> tuple[Tensor, Tensor]:
    tt = append_dims(t, ndim)
    return torch.cos(tt), torch.sin(tt)


def tangent(f: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, t: Tensor, dxdt: Tensor,
            mode: TangentMode = "jvp", h: float = 1e-4, impl: str = "torch") -> tuple[Tensor, Tensor]:
    """``(F, J)``: the student's ``F = f(x_t, t)`` and ``J = cos t sin t dF/dt`` along ``dx/dt = dxdt``
    (the teacher's guided ODE), without gradient.

    ``jvp``: ``torch.func.jvp`` of ``f`` at ``(x_t, t)`` with tangents ``(cos t sin t dxdt, cos t sin t)``,
    inside ``jvp_capable(impl)``. ``fd_t`` (rCM code fd_type 1): the x-part from a JVP with a zero
    t-tangent, the t-part ``cos t sin t (cos h F(x_t, t) - F(x_t, t - h)) / sin h``. ``fd`` (fd_type 2):
    one extra forward at ``x' = cos h x_t - sin h dxdt``, the exact TrigFlow step back by ``h`` along
    the ODE: ``J = cos t sin t (cos h F(x_t, t) - F(x', t - h)) / sin h``. ``h`` is in radians."""
    if mode not in TANGENT_MODES:
        raise ValueError(f"unknown tangent mode {mode!r}; expected one of {TANGENT_MODES}")
    c, s = _cs(t, x_t.ndim)
    cs_t = torch.cos(t) * torch.sin(t)
    with torch.no_grad():
        if mode == "jvp":
            with jvp_capable(impl):
                F, J = torch.func.jvp(f, (x_t, t), ((c * s * dxdt).to(x_t.dtype), cs_t.to(t.dtype)))
            return F, J
        t_back = t - h
        if mode == "fd_t":
            with jvp_capable(impl):
                F, J_x = torch.func.jvp(f, (x_t, t), ((c * s * dxdt).to(x_t.dtype), torch.zeros_like(t)))
            J_t = c * s * (math.cos(h) * F - f(x_t, t_back)) / math.sin(h)
            return F, J_x + J_t
        F = f(x_t, t)
        x_back = math.cos(h) * x_t - math.sin(h) * dxdt
        return F, c * s * (math.cos(h) * F - f(x_back, t_back)) / math.sin(h)


def warmup_ratio(step: int, warmup: int) -> float:
    """The tangent warm-up ``r = min(1, step / warmup)`` (1 without a warm-up)."""
    return 1.0 if warmup <= 0 else min(1.0, step / warmup)


def target(F_minus: Tensor, dxdt: Tensor, x_t: Tensor, t: Tensor, J: Tensor, sigma_d: float, r: float,
           form: WarmupForm = "paper") -> Tensor:
    """The sCM target ``g`` (before normalisation), with ``F_minus = sg(F)``:

    - ``paper`` (sCM; SANA-Sprint, rCM's paper): ``-cos^2 t (sigma_d F- - dxdt) - r (cos t sin t x_t + sigma_d J)``
    - ``code`` (rCM's current code): ``-cos t sqrt(1 - r^2 sin^2 t) (sigma_d F- - dxdt) - (r cos t sin t x_t + sigma_d J)``
    - ``code_v0`` (an earlier revision): the square-root factor and ``r`` on both terms.

    The three coincide at ``r = 1``."""
    if form not in WARMUP_FORMS:
        raise ValueError(f"unknown tangent warm-up form {form!r}; expected one of {WARMUP_FORMS}")
    c, s = _cs(t, x_t.ndim)
    c, s = c.to(x_t.dtype), s.to(x_t.dtype)
    teacher = sigma_d * F_minus - dxdt
    if form == "paper":
        return -c * c * teacher - r * (c * s * x_t + sigma_d * J)
    root = torch.sqrt((1 - r * r * s * s).clamp_min(0))
    if form == "code":
        return -c * root * teacher - (r * c * s * x_t + sigma_d * J)
    return -c * root * teacher - r * (c * s * x_t + sigma_d * J)


def normalise(g: Tensor, c: float = 0.1) -> Tensor:
    """``g / (||g||_2 + c)`` per sample over all non-batch dims, computed in float64 (section 5)."""
    norm = g.double().flatten(1).norm(dim=1)
    return (g.double() / append_dims(norm + c, g.ndim)).to(g.dtype)


def nonfinite_rows(*tensors: Tensor) -> Tensor:
    """``(B,)`` True for the samples where any of ``tensors`` holds a NaN or an infinity."""
    bad = torch.zeros(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for x in tensors:
        bad |= ~torch.isfinite(x.flatten(1)).all(1)
    return bad


def loss(F: Tensor, g: Tensor, reduction: Literal["sum", "mean"] = "sum", weight: Tensor | None = None,
         logvar: Tensor | None = None) -> Tensor:
    """Per-sample ``(B,)`` sCM loss ``||F - sg(F) - g||^2`` (whose gradient in ``F`` is ``-2 g``), summed
    (rCM) or averaged (SANA-Sprint, sCM) over the elements; times ``weight`` (B,) when given; with
    SANA-Sprint's adaptive weighting ``exp(-logvar) * d + logvar`` when ``logvar`` (B,) is given."""
    d = (F - F.detach() - g).float().pow(2).flatten(1)
    d = d.sum(1) if reduction == "sum" else d.mean(1)
    if weight is not None:
        d = d * weight
    if logvar is not None:
        d = torch.exp(-logvar) * d + logvar
    return d


def sana_weight(t: Tensor, sigma_d: float) -> Tensor:
    """SANA-Sprint's time weight ``1 / (sigma_d tan t)`` (sana_sprint.md section 4, step 7)."""
    return 1.0 / (sigma_d * torch.tan(t))


def time_from_sigma(sigma: Tensor, sigma_d: float) -> Tensor:
    """``t = atan(sigma / sigma_d)``: the TrigFlow time of an EDM noise level (``log sigma ~ N(mu, s^2)``
    is the sCM time law)."""
    return torch.atan(sigma / sigma_d)


def student_loss(f: Callable[[Tensor, Tensor], Tensor], x_t: Tensor, t: Tensor, dxdt: Tensor, sigma_d: float, r: float,
                 form: WarmupForm = "paper", mode: TangentMode = "jvp", h: float = 1e-4, impl: str = "torch",
                 norm_c: float = 0.1, reduction: Literal["sum", "mean"] = "sum", weight: Tensor | None = None,
                 logvar: Tensor | None = None) -> tuple[Tensor, dict]:
    """The sCM student loss per sample ``(B,)`` at ``(x_t, t)`` along ``dx/dt = dxdt``: the tangent
    (no grad), the grad forward ``F = f(x_t, t)``, the target with warm-up ratio ``r``, normalised per
    sample; samples whose target or ``F`` is not finite are dropped (zero loss, no gradient). Also
    returns ``{"nonfinite_rows", "J_norm"}`` to log."""
    _, J = tangent(f, x_t, t, dxdt, mode, h, impl)
    F = f(x_t, t)
    g = target(F.detach(), dxdt, x_t, t, J, sigma_d, r, form)
    bad = nonfinite_rows(g, F)
    keep = append_dims((~bad).to(F.dtype), F.ndim)
    g = normalise(torch.nan_to_num(g) * keep, norm_c)
    per = loss(torch.nan_to_num(F) * keep, g, reduction, weight, logvar)
    return per, {"nonfinite_rows": bad.float().sum(), "J_norm": J.flatten(1).norm(dim=1).mean()}


def dense_phase_end(phases: dict, student_time_scale: float | None, teacher_time_scale: float) -> int:
    """The iteration at which the schedule's ``dense`` phase ends (0 without one), checked against
    ``module.student_time_scale``: a student that reads its time at another scale than the teacher
    (the dense time embedding: ``s`` where the teacher reads ``1000 s``) is no longer the teacher's
    function and needs that phase to be fitted back to it; the phase without the rescaling is an error."""
    from common.config import ConfigError

    dense = student_time_scale is not None and student_time_scale != teacher_time_scale
    if dense and DENSE_PHASE not in phases:
        raise ConfigError(f"module.student_time_scale={student_time_scale} differs from the teacher's time scale "
                          f"{teacher_time_scale}: the schedule needs a {DENSE_PHASE!r} phase that fits the student to it")
    if DENSE_PHASE in phases and not dense:
        raise ConfigError(f"the schedule's {DENSE_PHASE!r} phase needs module.student_time_scale different from "
                          f"the teacher's {teacher_time_scale}")
    return phases[DENSE_PHASE].until if dense else 0


def dense_loss(student: Callable[[Tensor, Tensor], Tensor], teacher: Callable[[Tensor, Tensor], Tensor], x_t: Tensor,
               t: Tensor) -> Tensor:
    """The ``dense`` phase's loss: the mean square of the student's ``F`` (at its own time scale)
    against the frozen teacher's ``F`` (no gradient) at ``(x_t, t)``."""
    with torch.no_grad():
        target = teacher(x_t, t)
    return (student(x_t, t) - target).float().pow(2).mean()
