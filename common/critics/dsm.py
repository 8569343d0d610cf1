"""Fake-score critic training by denoising score matching (papers/README.md section 3).

x0 form ``E[lambda(t) ||x0_hat_psi(a x_g + b eps, t) - x_g||^2]`` and eps form
``E[lambda'(t) ||eps_hat_psi - eps||^2]``; the eps-MSE equals ``(a/b)^2`` times the x0-MSE.
Weightings in use: DMD2 (eps, uniform), SwiftBrush code (eps, alpha_bar = a^2 for VP),
rCM (x0, 1/sin^2 t), Uni-Instruct (x0, EDM (sigma^2 + sigma_d^2)/(sigma sigma_d)^2); ``inv_b2``
(x0, 1/b^2) is a rectified-flow teacher's own loss, the velocity MSE, for any a.
"""
from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from common import noise

DSMWeighting = Literal["uniform", "alpha_bar", "inv_sin2", "inv_b2", "edm"]
WEIGHTINGS = get_args(DSMWeighting)


def dsm_weight(kind: str, level: noise.NoiseLevel, sigma_d: float = 0.5) -> Tensor:
    """Per-sample weight lambda(t) for a level (a, b) with a^2 + b^2 = 1 for ``alpha_bar`` / ``inv_sin2``;
    ``edm`` uses sigma = b / a (the VE noise level at equal SNR)."""
    a, b = torch.as_tensor(level.a), torch.as_tensor(level.b)
    if kind == "uniform":
        return torch.ones_like(a)
    if kind == "alpha_bar":
        return a**2 / (a**2 + b**2)
    if kind == "inv_sin2":
        return (a**2 + b**2) / b**2
    if kind == "inv_b2":  # x0 form: a flow teacher's own velocity MSE, ||u_hat - u||^2 = ||x0_hat - x0||^2 / s^2
        return 1 / b**2
    if kind == "edm":
        sigma = b / a
        return (sigma**2 + sigma_d**2) / (sigma * sigma_d) ** 2
    raise ValueError(f"unknown DSM weighting {kind!r}; expected one of {WEIGHTINGS}")


def dsm_loss(pred: Tensor, x0: Tensor, eps: Tensor, x_t: Tensor, level: noise.NoiseLevel, kind: str,
             form: str = "eps", weighting: str = "uniform", sigma_d: float = 0.5) -> Tensor:
    """Mean over the batch of ``lambda(t) * mean-over-elements squared error`` of the critic's
    prediction ``pred`` (of ``kind``) against the true x0 (``form='x0'``) or eps (``form='eps'``)."""
    x0_hat, eps_hat = noise.to_x0_eps(kind, pred, x_t, level)
    err = (eps_hat - eps) if form == "eps" else (x0_hat - x0) if form == "x0" else None
    if err is None:
        raise ValueError(f"unknown DSM form {form!r}; expected 'eps' or 'x0'")
    w = dsm_weight(weighting, level, sigma_d).to(err.dtype)
    return (w * err.pow(2).flatten(1).mean(1)).mean()
