"""Uni-Instruct generator loss (papers/uni_instruct.md section 4), pure functions of tensors.

``L_G,i = a_f(r_i) L_SIM,i + b_f(r_i) N_delta,i L_DI,i`` with every weight stop-gradient; ``y_r`` and
``y_f`` are the teacher's and the fake score's x0-predictions at ``x_t = x_g + sigma n``, functions
of ``x_g`` (the gradient flows through ``x_t``, not into the networks' weights).
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor


def _ones(r):
    return torch.ones_like(r)


def _zeros(r):
    return torch.zeros_like(r)


Preset = Literal["rkl", "fkl", "jeffrey", "js", "chi2", "di", "fdistill_rkl", "fdistill_fkl", "fdistill_jeffrey",
                 "fdistill_js", "fdistill_chi2", "custom"]  # the keys of PRESETS and "custom" (checked at import)

# preset -> (a_f, b_f); a_f = psi_f(r) = r^2 f''(r), b_f = r^2 psi_f''(r) (section 4 table)
PRESETS = {
    "rkl": (_ones, _zeros),  # f = -log r: SiD (alpha = 1)
    "fkl": (lambda r: r, _zeros),  # f = r log r
    "jeffrey": (lambda r: 1 + r, _zeros),
    "js": (lambda r: r / (2 * (1 + r)), lambda r: -(r**2) / (1 + r) ** 3),  # unverified against Theorem 3.2
    "chi2": (lambda r: 2 * r**2, lambda r: 4 * r**2),  # unverified against Theorem 3.2
    "di": (_zeros, _ones),  # Diff-Instruct / DMD, r = 1 and N_delta = 1
}


# psi_f = r^2 f''(r) and its first two derivatives, for the surrogates of the exact gradient
PSI = {
    "rkl": (_ones, _zeros, _zeros),
    "fkl": (lambda r: r, _ones, _zeros),
    "jeffrey": (lambda r: 1 + r, _ones, _zeros),
    "js": (lambda r: r / (2 * (1 + r)), lambda r: 1 / (2 * (1 + r) ** 2), lambda r: -1 / (1 + r) ** 3),
    "chi2": (lambda r: 2 * r**2, lambda r: 4 * r, lambda r: 4 * torch.ones_like(r)),
}
# f-distill: a_f = 0, b_f = psi_f(r) with N_delta = 1 (spec section 4, integrated over noise levels)
PRESETS.update({f"fdistill_{f}": (_zeros, fns[0]) for f, fns in PSI.items()})
assert set(get_args(Preset)) == set(PRESETS) | {"custom"}


def per_sample(x: Tensor) -> Tensor:
    return x.flatten(1).sum(1)


@torch.no_grad()
def dmd_normaliser(x_g: Tensor, y_r: Tensor, min_norm: float = 1e-5) -> Tensor:
    """``w_f = max(mean|x_g - y_r|, 1e-5)`` per sample."""
    return (x_g - y_r).abs().flatten(1).mean(1).clamp_min(min_norm)


def sid_loss(x_g: Tensor, y_r: Tensor, y_f: Tensor, w_f: Tensor, alpha: float = 1.0) -> Tensor:
    """SiD / SIM score branch per sample: ``[(1 - alpha) ||y_r - y_f||^2 + <y_r - y_f, y_f - x_g>] / w_f``."""
    d = y_r - y_f
    return ((1 - alpha) * per_sample(d * d) + per_sample(d * (y_f - x_g))) / w_f


def di_loss(x_g: Tensor, y_r: Tensor, y_f: Tensor, w_f: Tensor) -> Tensor:
    """Diff-Instruct / DMD branch per sample: ``<x_g, sg((y_f - y_r) / w_f)>``, so ``dL/dx_g = g``."""
    g = ((y_f - y_r) / w_f.view(-1, *([1] * (x_g.ndim - 1)))).detach()
    return per_sample(x_g * g)


@torch.no_grad()
def density_ratio(logit: Tensor, mode: str = "logit_exp", selfnorm: bool = False, bce_mean: Tensor | None = None,
                  chw: int | None = None, w_f: Tensor | None = None) -> Tensor:
    """``r = q/p``. ``logit_exp`` (paper): ``exp(clamp(mean_hw logit, -10, 10))`` per sample, since
    ``D = sigmoid(logit) ~ q / (q + p)``. ``code_bce`` (official code): ``-L / (1 - L)`` with
    ``L = batch-mean BCE * C*H*W / w_f``, which is ~1 everywhere."""
    if mode == "logit_exp":
        r = torch.exp(logit.flatten(1).mean(1).clamp(-10, 10))
    elif mode == "code_bce":
        if bce_mean is None or chw is None or w_f is None:
            raise ValueError("density_ratio='code_bce' needs the batch-mean BCE, C*H*W and w_f")
        big = bce_mean * chw / w_f
        r = -big / (1 - big)
    else:
        raise ValueError(f"unknown density_ratio {mode!r}; expected 'logit_exp' or 'code_bce'")
    return r / r.mean() if selfnorm else r


@torch.no_grad()
def di_norm(y_r: Tensor, y_f: Tensor, w_f: Tensor, mode: str = "per_sample") -> Tensor:
    """N_delta: ``RMS(y_r - y_f) / w_f`` per sample (default), the whole-batch 2-norm (code), or 1."""
    d = y_r - y_f
    if mode == "per_sample":
        return d.flatten(1).pow(2).mean(1).sqrt() / w_f
    if mode == "batch":
        return d.norm().expand(len(d))
    if mode == "none":
        return torch.ones(len(d), device=d.device, dtype=d.dtype)
    raise ValueError(f"unknown di_norm {mode!r}; expected per_sample, batch or none")


Gradient = Literal["paper", "exact", "exact_sid"]


def exact_loss(x_g: Tensor, y_r: Tensor, y_f: Tensor, r: Tensor, sigma: Tensor, preset: str = "fkl",
               sid_shift: bool = False, normalise: bool = True, psi_fns: tuple | None = None) -> Tensor:
    """Per-sample surrogate whose expected gradient is ``(sigma^4 / 2) grad E_{p_sigma}[psi_f(r)
    ||s_p - s_q||^2]`` (with ``normalise=False``; tests/test_uni_instruct_exact.py checks it by
    quadrature), with ``delta = y_r - y_f``::

        L* = psi(r) L_SIM(alpha_f) + sg(c) <x_g, sg(y_f - y_r)>
        alpha_f = 1/2 + r psi'(r) / (2 psi(r))
        c = r^2 psi''(r) ||delta||^2 / (2 sigma^2) - r psi'(r) <delta, y_f - x_g> / sigma^2

    ``sid_shift`` adds 1/2 to ``alpha_f`` (``gradient: exact_sid``: ``rkl`` is then SiD's alpha = 1;
    not exact). ``normalise`` divides the whole loss by ``w_f``, as in the SiD form. ``psi_fns``
    replaces the preset's ``(psi, psi', psi'')`` (the weighted Jeffrey divergence)."""
    if preset not in PSI and psi_fns is None:
        raise ValueError(f"the exact gradient applies to the f-divergence presets {sorted(PSI)}, not {preset!r}")
    psi, dpsi, d2psi = (fn(r.detach()) for fn in (psi_fns or PSI[preset]))
    r = r.detach()
    alpha = 0.5 + (0.5 if sid_shift else 0.0) + r * dpsi / (2 * psi)
    ones = torch.ones_like(r)
    sim = sid_loss(x_g, y_r, y_f, ones, alpha)
    with torch.no_grad():
        d = y_r - y_f
        s2 = sigma.reshape(-1) ** 2
        c = r**2 * d2psi * per_sample(d * d) / (2 * s2) - r * dpsi * per_sample(d * (y_f - x_g)) / s2
    loss = psi * sim + c * di_loss(x_g, y_r, y_f, ones)
    return loss / dmd_normaliser(x_g, y_r) if normalise else loss


def generator_loss(x_g: Tensor, y_r: Tensor, y_f: Tensor, r: Tensor, preset: str = "fkl", alpha: float = 1.0,
                   norm: str = "per_sample", jeffrey_weights: tuple | None = None, gradient: str = "paper",
                   sigma: Tensor | None = None, custom: tuple | None = None) -> Tensor:
    """Per-sample ``L_G,i``. ``r`` is the stop-gradient density ratio (ignored by ``di``).
    ``gradient="paper"``: the spec's presets; ``"exact"`` / ``"exact_sid"``: :func:`exact_loss`
    (needs the per-sample noise level ``sigma``). ``preset="custom"`` takes ``custom = (a, b)``, two
    functions of ``r`` (the spec's user callables; paper gradient only)."""
    if preset == "custom":
        if custom is None or len(custom) != 2 or gradient != "paper":
            raise ValueError("preset 'custom' needs custom=(a, b), two functions of r, and gradient='paper'")
    elif preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if gradient != "paper":
        if gradient not in ("exact", "exact_sid") or sigma is None:
            raise ValueError(f"gradient={gradient!r} needs to be 'paper', or 'exact' / 'exact_sid' with sigma")
        fns = None
        if preset == "jeffrey" and jeffrey_weights:  # psi = w1 r + w2
            w1, w2 = jeffrey_weights
            fns = (lambda r: w1 * r + w2, lambda r: w1 * torch.ones_like(r), _zeros)
        return exact_loss(x_g, y_r, y_f, r, sigma, preset, sid_shift=gradient == "exact_sid", psi_fns=fns)
    w_f = dmd_normaliser(x_g, y_r)
    if preset == "di":
        return di_loss(x_g, y_r, y_f, w_f)
    a_fn, b_fn = custom if preset == "custom" else PRESETS[preset]
    r = r.detach()
    a = a_fn(r) if not (preset == "jeffrey" and jeffrey_weights) else jeffrey_weights[0] * r + jeffrey_weights[1]
    b = b_fn(r)
    loss = a * sid_loss(x_g, y_r, y_f, w_f, alpha)
    if bool((b != 0).any()):
        norm = "none" if preset.startswith("fdistill_") else norm
        loss = loss + b * di_norm(y_r, y_f, w_f, norm) * di_loss(x_g, y_r, y_f, w_f)
    return loss


def critic_loss(y_f: Tensor, x_g: Tensor, weight: Tensor, logit_fake: Tensor | None = None,
                logit_real: Tensor | None = None) -> Tensor:
    """Fake-score DSM (x0 form, EDM weight) plus the discriminator's BCE on the shared encoder:
    ``mean_i lambda ||y_f - x_g||^2 + mean_i lambda 1/2 [BCE(l_real, 1) + BCE(l_fake, 0)]``."""
    dsm = weight * per_sample((y_f - x_g) ** 2)
    if logit_fake is None:
        return dsm.mean()
    bce = 0.5 * (F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real), reduction="none")
                 .flatten(1).mean(1)
                 + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake), reduction="none")
                 .flatten(1).mean(1))
    return (dsm + weight * bce).mean()


def generator_gan_loss(logit: Tensor, w_f: Tensor) -> Tensor:
    """SiDA-style generator term per sample: ``BCE(clamp(l, +-10), 1) / w_f``."""
    lg = logit.clamp(-10, 10)
    return F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg), reduction="none").flatten(1).mean(1) / w_f
