"""Generator-gradient surrogates shared by the score-distillation methods (papers/README.md section 4).

The reverse-KL gradient at a noise level is applied through a stop-gradient surrogate:
``L = 1/2 ||x - sg(x - g)||^2`` has ``dL/dx = g`` exactly (``reduction="sum"``) or ``g / N``
(``"mean"`` over all elements). Its value only tracks ``||g||^2``: log the gradient norm instead.
"""
from __future__ import annotations

import torch
from torch import Tensor


def surrogate_loss(x: Tensor, g: Tensor, reduction: str = "mean") -> Tensor:
    """``1/2 ||x - sg(x - g)||^2``: backpropagates ``g`` (sum) or ``g / x.numel()`` (mean) into x;
    ``per_sample_mean`` leaves one loss per sample, each the mean over its elements."""
    sq = 0.5 * (x - (x - g).detach()).pow(2)
    if reduction == "sum":
        return sq.sum()
    if reduction == "mean":
        return sq.mean()
    if reduction == "per_sample_sum":  # sum over elements, mean over the batch
        return sq.flatten(1).sum(1).mean()
    if reduction == "per_sample_mean":  # mean over each sample's elements, (B,): its mean is "mean"
        return sq.flatten(1).mean(1)
    raise ValueError(f"unknown reduction {reduction!r}; expected 'sum', 'mean', 'per_sample_sum' or "
                     f"'per_sample_mean'")


@torch.no_grad()
def dmd_gradient(x0_fake: Tensor, x0_real: Tensor, x: Tensor, min_norm: float = 1e-5) -> Tensor:
    """DMD: ``g = (x0_fake - x0_real) / max(mean|x - x0_real|, min_norm)`` per sample, nan-to-num'd.
    Descent moves x toward the teacher's denoised estimate and away from the fake one."""
    w = (x - x0_real).abs().flatten(1).mean(1).clamp_min(min_norm)
    g = (x0_fake - x0_real) / w.view(-1, *([1] * (x.ndim - 1)))
    return torch.nan_to_num(g)


@torch.no_grad()
def vsd_gradient(eps_real: Tensor, eps_fake: Tensor, b: Tensor) -> Tensor:
    """VSD (eps form): ``g = b^2 (eps_real - eps_fake)`` with ``b`` the noise coefficient (sigma_t for VP,
    s for flow), nan-to-num'd. Same direction as DMD's x0 form since ``eps = (x - a x0) / b``."""
    bb = b.view(-1, *([1] * (eps_real.ndim - 1))).to(eps_real.dtype)
    return torch.nan_to_num(bb**2 * (eps_real - eps_fake))
