"""Samplers with one signature: ``sample_<name>(model, x, ts, cond=None, generator=None, callback=None)``.

``model`` is a :class:`common.teachers.Denoiser` (or :class:`Guided`) with ``x0_eps(x, t, cond)``
and ``level(t)``; ``ts`` runs from the noise end to the data end in the model's own convention;
``x`` is the starting noise scaled for ``ts[0]`` (pure noise ``b(ts[0]) * eps`` with ``a ~ 0``).
Teacher ODE solvers (Euler, Heun) and student few-step samplers are therefore interchangeable.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from common import noise


def timesteps(convention: noise.Convention, n: int, device=None, s_min: float = 0.0) -> Tensor:
    """``n + 1`` times uniform in flow time ``s`` from 1 (noise) to ``s_min`` (data), mapped to the
    convention by SNR matching. Flow-convention times are returned directly."""
    s = torch.linspace(1.0, s_min, n + 1, dtype=torch.float64)
    if isinstance(convention, noise.RectifiedFlow) and convention.data_scale == 1.0:
        return s.to(device=device, dtype=torch.float32)
    inner = noise.match_time(s[1:-1] if s_min == 0.0 else s[1:], noise.RectifiedFlow(), convention)
    ends = [torch.tensor([convention.t_noise], dtype=torch.float64)]
    mid = [inner]
    tail = [torch.tensor([convention.t_data], dtype=torch.float64)] if s_min == 0.0 else []
    return torch.cat(ends + mid + tail).to(device=device, dtype=torch.float32)


def initial_noise(convention: noise.Convention, t0: Tensor, shape, generator=None, device=None) -> Tensor:
    eps = torch.randn(shape, generator=generator, device=device)
    return convention.level(t0).b.float() * eps


def _step(model, x0: Tensor, eps: Tensor, t_next: Tensor) -> Tensor:
    lv = model.level(t_next).expand(x0.ndim)
    return lv.a.to(x0.dtype) * x0 + lv.b.to(x0.dtype) * eps


@torch.no_grad()
def sample_euler(model, x: Tensor, ts: Tensor, cond=None, generator=None, callback: Callable | None = None) -> Tensor:
    """DDIM step ``x' = a' x0_hat + b' eps_hat``: Euler on the probability-flow ODE in sigma = b/a
    (for rectified flow it is exactly Euler on the velocity in s)."""
    for i in range(len(ts) - 1):
        p = model.x0_eps(x, ts[i], cond)
        x = _step(model, p.x0, p.eps, ts[i + 1])
        if callback:
            callback(i, x, p.x0)
    return x


@torch.no_grad()
def sample_heun(model, x: Tensor, ts: Tensor, cond=None, generator=None, callback: Callable | None = None) -> Tensor:
    """Heun's second-order method in sigma = b/a (EDM Algorithm 1 without churn); Euler on the last
    step when it ends at sigma = 0."""
    for i in range(len(ts) - 1):
        t, tn = ts[i], ts[i + 1]
        lv, lvn = model.level(t), model.level(tn)
        a, sig = float(lv.a), float(lv.b / lv.a)
        an, sign = float(lvn.a), float(lvn.b / lvn.a)
        p = model.x0_eps(x, t, cond)
        y = x / a
        y_next = y + (sign - sig) * p.eps
        if sign > 0:
            p2 = model.x0_eps(an * y_next, tn, cond)
            y_next = y + (sign - sig) * 0.5 * (p.eps + p2.eps)
        x = an * y_next
        if callback:
            callback(i, x, p.x0)
    return x


@torch.no_grad()
def sample_multistep(model, x: Tensor, ts: Tensor, cond=None, generator=None, callback: Callable | None = None) -> Tensor:
    """Few-step (consistency-style) student sampling: predict x0, re-noise it with fresh noise at
    the next time, repeat; the last prediction is returned."""
    for i in range(len(ts) - 1):
        x0 = model.x0_eps(x, ts[i], cond).x0
        if float(model.level(ts[i + 1]).b) > 0:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = _step(model, x0, eps, ts[i + 1])
        else:
            x = x0
        if callback:
            callback(i, x, x0)
    return x


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "multistep": sample_multistep}


def generate(model, shape, steps: int, cond=None, sampler: str = "euler", seed: int = 0,
             batch_size: int = 500, device="cpu", progress: bool = False) -> Tensor:
    """Sample ``shape[0]`` outputs in batches with noise from one seeded generator (reproducible)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    fn = SAMPLERS[sampler]
    g = torch.Generator(device="cpu").manual_seed(seed)
    ts = timesteps(model.convention, steps, device=device)
    n = shape[0]
    out = []
    starts = range(0, n, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc=f"{sampler} {steps} steps", leave=False)
    for s in starts:
        b = min(batch_size, n - s)
        x = initial_noise(model.convention, ts[0], (b, *shape[1:]), generator=g).to(device)
        c = None if cond is None else cond[s:s + b].to(device)
        out.append(fn(model, x, ts, c, generator=g).cpu())
    return torch.cat(out)
