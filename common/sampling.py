"""Samplers with one signature: ``sample_<name>(model, x, ts, cond=None, noise=None, callback=None)``.

``model`` is a :class:`common.teachers.Denoiser` (or :class:`Guided`) with ``x0_eps(x, t, cond)``
and ``level(t)``; ``ts`` runs from the noise end to the data end in the model's own convention;
``x`` is the starting noise scaled for ``ts[0]`` (pure noise ``b(ts[0]) * eps`` with ``a ~ 0``).
``noise(i, x)`` returns fresh standard-normal noise shaped like ``x`` for step ``i`` (the re-noising
to ``ts[i + 1]``); the ODE solvers ignore it, and without it the few-step sampler draws from the
global RNG. :func:`generate` keys it per sample, so a sample does not depend on its batch.
Teacher ODE solvers (Euler, Heun) and student few-step samplers are therefore interchangeable.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Callable

import torch
from torch import Tensor

from common import noise as noise_lib
from common.rng import SAMPLING_RENOISE, randn_per_sample

NoiseFn = Callable[[int, Tensor], Tensor]

# generate() re-noises sample j at step i from keyed_generator(seed, SAMPLING_RENOISE, i, j) (common/rng.py)
# generate() draws the initial noise of all samples from one generator seeded with ``seed``, in
# consecutive chunks of this many samples whatever the batch size. 500 is the former per-batch draw
# at the default batch size, so the recorded protocol figures keep their noise: two draws of 1,000
# values (500 2-D toy points) are not one draw of 2,000, since torch.randn fills a tensor whose size
# is not a multiple of 16 differently. For images (1,024 values a sample) it is one draw of the set.
NOISE_CHUNK = 500
END_TOL = 1e-4  # sampling times this close outside the time range are its end (pi/2 written as 1.5708)


def timesteps(convention: noise_lib.Convention, n: int, device=None, s_min: float = 0.0) -> Tensor:
    """``n + 1`` times uniform in flow time ``s`` from 1 (noise) to ``s_min`` (data), mapped to the
    convention by SNR matching. Flow-convention times are returned directly."""
    s = torch.linspace(1.0, s_min, n + 1, dtype=torch.float64)
    if isinstance(convention, noise_lib.RectifiedFlow) and convention.data_scale == 1.0:
        return s.to(device=device, dtype=torch.float32)
    inner = noise_lib.match_time(s[1:-1] if s_min == 0.0 else s[1:], noise_lib.RectifiedFlow(), convention)
    ends = [torch.tensor([convention.t_noise], dtype=torch.float64)]
    mid = [inner]
    tail = [torch.tensor([convention.t_data], dtype=torch.float64)] if s_min == 0.0 else []
    return torch.cat(ends + mid + tail).to(device=device, dtype=torch.float32)


def student_times(convention: noise_lib.Convention, steps, device=None) -> Tensor:
    """The time grid a sampler runs on. ``steps`` is an int (that many steps uniform in flow time,
    :func:`timesteps`) or a list of the sampling times in the convention's own time, from the noise
    end toward the data end, e.g. ``[1.3, 1.0, 0.6]`` in TrigFlow: the few-step sampler predicts x0 at
    each listed time and re-noises to the next one, and returns its prediction at the last one; the
    grid is the list followed by the data end ``t_data``. The start is pure noise ``b(t0) * eps``, so
    a first time short of ``t_noise`` starts from noise that ignores the data share ``a(t0)``."""
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        return timesteps(convention, int(steps), device=device)
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence):
        raise ValueError(f"steps must be an int or a list of times, got {steps!r}")
    times = list(steps)
    if not times:
        raise ValueError("the list of sampling times is empty")
    if not all(isinstance(t, numbers.Real) and not isinstance(t, bool) for t in times):
        raise ValueError(f"sampling times must be numbers, got {times}")
    times = [float(t) for t in times]
    t_noise, t_data = float(convention.t_noise), float(convention.t_data)
    lo, hi = min(t_noise, t_data), max(t_noise, t_data)
    # an end written to four decimals (1.5708 for TrigFlow's pi/2) is that end
    times = [hi if hi < t <= hi + END_TOL else lo if lo - END_TOL <= t < lo else t for t in times]
    bad = [t for t in times if not lo <= t <= hi]  # NaN is out of range too
    if bad:
        raise ValueError(f"sampling times {bad} are outside [{lo:g}, {hi:g}], the time range of "
                         f"{type(convention).__name__}")
    sign = 1.0 if t_noise > t_data else -1.0  # ReversedFlow counts from 0 (noise) up to 1 (data)
    if any(sign * (t1 - t0) >= 0 for t0, t1 in zip(times, times[1:])):
        word = "decreasing" if sign > 0 else "increasing"
        raise ValueError(f"sampling times must be strictly {word} (from the noise end t={t_noise:g} toward "
                         f"the data end t={t_data:g}), got {times}")
    return torch.tensor(times + [t_data], dtype=torch.float64).to(device=device, dtype=torch.float32)


def initial_noise(convention: noise_lib.Convention, t0: Tensor, shape, generator=None, device=None) -> Tensor:
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
    return (b / (a + b)), noise_lib.append_dims(a + b, ndim)


@torch.no_grad()
def sample_euler(model, x: Tensor, ts: Tensor, cond=None, noise: NoiseFn | None = None,
                 callback: Callable | None = None) -> Tensor:
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
def sample_heun(model, x: Tensor, ts: Tensor, cond=None, noise: NoiseFn | None = None,
                 callback: Callable | None = None) -> Tensor:
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
def sample_multistep(model, x: Tensor, ts: Tensor, cond=None, noise: NoiseFn | None = None,
                     callback: Callable | None = None) -> Tensor:
    """Few-step (consistency-style) student sampling: predict x0, re-noise it with fresh noise at
    the next time, repeat; the last prediction is returned."""
    for i in range(len(ts) - 1):
        x0 = model.x0_eps(x, ts[i], cond).x0
        # re-noise to the next time, except at the end: the data end of EDM is sigma_min > 0
        if i < len(ts) - 2 and float(model.level(ts[i + 1]).b) > 0:
            eps = torch.randn_like(x) if noise is None else noise(i, x).to(device=x.device, dtype=x.dtype)
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

    def __init__(self, fn: Callable, convention: noise_lib.Convention, net: torch.nn.Module | None = None):
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


def keyed_noise(seed: int, start: int = 0) -> NoiseFn:
    """The sampler's ``noise`` for a batch whose first sample is sample ``start`` of the whole set:
    sample ``start + k`` at step ``i`` draws from ``keyed_generator(seed, SAMPLING_RENOISE, i, start + k)``."""
    def draw(i: int, x: Tensor) -> Tensor:
        pos = torch.arange(start, start + x.shape[0])
        return randn_per_sample((seed, SAMPLING_RENOISE, i), pos, x.shape[1:], x.dtype).to(x.device)
    return draw


def _initial_noise_batches(convention, t0: Tensor, shape, seed: int, batch_size: int):
    """The initial noise of ``shape[0]`` samples, cut into batches: drawn from one generator seeded with
    ``seed`` in chunks of :data:`NOISE_CHUNK` samples, so it does not depend on ``batch_size``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, drawn, buf = shape[0], 0, []
    for s in range(0, n, batch_size):
        b = min(batch_size, n - s)
        while sum(len(c) for c in buf) < b:
            c = min(NOISE_CHUNK, n - drawn)
            buf.append(initial_noise(convention, t0, (c, *shape[1:]), generator=g))
            drawn += c
        pool = buf[0] if len(buf) == 1 else torch.cat(buf)
        yield s, pool[:b]
        buf = [pool[b:]] if len(pool) > b else []


def generate(model, shape, steps: int | Sequence[float], cond=None, sampler: str = "euler", seed: int = 0,
             batch_size: int = 500, device="cpu", progress: bool = False) -> Tensor:
    """Sample ``shape[0]`` outputs in batches of ``batch_size``, reproducibly: the initial noise comes
    from one generator seeded with ``seed`` (see :data:`NOISE_CHUNK`), the few-step sampler's
    re-noising from generators keyed by (seed, step, global sample index) (:func:`keyed_noise`); so a
    sample depends on neither the batch size nor the batch it lands in. ``steps``: an int or a list of
    times (:func:`student_times`)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    fn = SAMPLERS[sampler]
    ts = student_times(model.convention, steps, device=device)
    n = shape[0]
    out = []
    batches = _initial_noise_batches(model.convention, ts[0].cpu(), shape, seed, batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, total=-(-n // batch_size), desc=f"{sampler} {len(ts) - 1} steps", leave=False)
    for s, x in batches:
        b = len(x)
        c = None if cond is None else cond[s:s + b].to(device)
        out.append(fn(model, x.to(device), ts, c, noise=keyed_noise(seed, s)).cpu())
    return torch.cat(out)
