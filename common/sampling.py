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


def _flow_form(model, t, ndim):
    """SNR-matched rectified-flow time ``s = b / (a + b)`` and scale ``a + b`` (``x_flow = x / (a + b)``);
    finite at both ends of every convention."""
    lv = model.level(t)
    a, b = lv.a, lv.b
    return (b / (a + b)), noise.append_dims(a + b, ndim)


@torch.no_grad()
def sample_euler(model, x: Tensor, ts: Tensor, cond=None, generator=None, callback: Callable | None = None) -> Tensor:
    """Euler on the probability-flow ODE written in SNR-matched flow time: ``x_f' = x_f + (s' - s) u``
    with ``u = eps_hat - x0_hat``. This equals the DDIM step ``x' = a' x0_hat + b' eps_hat`` and, for a
    rectified-flow teacher, plain Euler on its velocity."""
    for i in range(len(ts) - 1):
        p = model.x0_eps(x, ts[i], cond)
        x = _step(model, p.x0, p.eps, ts[i + 1])
        if callback:
            callback(i, x, p.x0)
    return x


@torch.no_grad()
def sample_heun(model, x: Tensor, ts: Tensor, cond=None, generator=None, callback: Callable | None = None) -> Tensor:
    """Heun's second-order method on the same flow-time ODE (EDM Algorithm 1 without churn); the
    last step is plain Euler when it ends at the data end, where the second evaluation is undefined."""
    for i in range(len(ts) - 1):
        s, k = _flow_form(model, ts[i], x.ndim)
        s_next, k_next = _flow_form(model, ts[i + 1], x.ndim)
        p = model.x0_eps(x, ts[i], cond)
        u = p.eps - p.x0
        xf_next = x / k + (s_next - s).to(x.dtype) * u
        if float(s_next) > 0:
            p2 = model.x0_eps(xf_next * k_next.to(x.dtype), ts[i + 1], cond)
            xf_next = x / k + (s_next - s).to(x.dtype) * 0.5 * (u + p2.eps - p2.x0)
        x = xf_next * k_next.to(x.dtype)
        if callback:
            callback(i, x, p.x0)
    return x


@torch.no_grad()
def sample_multistep(model, x: Tensor, ts: Tensor, cond=None, generator=None, callback: Callable | None = None) -> Tensor:
    """Few-step (consistency-style) student sampling: predict x0, re-noise it with fresh noise at
    the next time, repeat; the last prediction is returned."""
    for i in range(len(ts) - 1):
        x0 = model.x0_eps(x, ts[i], cond).x0
        # re-noise to the next time, except at the end: the data end of EDM is sigma_min > 0
        if i < len(ts) - 2 and float(model.level(ts[i + 1]).b) > 0:
            eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = _step(model, x0, eps, ts[i + 1])
        else:
            x = x0
        if callback:
            callback(i, x, x0)
    return x


class OneStepGenerator(torch.nn.Module):
    """A one-step generator ``x0 = fn(z, cond)`` seen as a denoiser by :func:`sample_multistep`: the
    sampler's start ``x = b(t_noise) z`` is turned back into ``z``. It is one-step only; a call at any
    other time is an error rather than a silently wrong re-noising."""

    def __init__(self, fn: Callable, convention: noise.Convention, net: torch.nn.Module | None = None):
        super().__init__()
        self.fn, self.convention, self._net = fn, convention, net
        self.null_label = None

    @property
    def net(self):
        return self._net

    def level(self, t):
        return self.convention.level(t)

    def x0_eps(self, x: Tensor, t, cond):
        from common.teachers.denoiser import Prediction

        t = torch.as_tensor(t, dtype=torch.float64)
        if not torch.allclose(t, torch.tensor(float(self.convention.t_noise), dtype=torch.float64)):
            raise ValueError("a one-step generator samples with 1 step only (steps=1)")
        b = float(self.convention.level(t.reshape(-1)[:1]).b)
        z = x / b
        x0 = self.fn(z, cond)
        return Prediction(x0, z)


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
