"""One entry point that makes a whole model JVP-capable.

``with jvp_capable(): torch.func.jvp(model, primals, tangents)`` routes every softmax attention,
the embedded networks' (common.nets.attention) and every ``F.scaled_dot_product_attention`` call
made by diffusers attention processors (SANA, FLUX, Wan, SD UNet), through the tangent-aware
attention of common/kernels/attention_jvp.py, and makes ``F.group_norm`` take a contiguous input
(its forward-AD rule fails on a non-contiguous one). Outside the context nothing is changed.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from common.kernels.attention_jvp import attention
from common.nets import attention as nets_attention

_sdpa = F.scaled_dot_product_attention
_group_norm = F.group_norm


def _tangent_sdpa(impl: str):
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if dropout_p:
            raise ValueError("attention dropout has no place in a JVP pass (got dropout_p > 0)")
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            rep = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
        if is_causal:
            n, m = query.shape[-2], key.shape[-2]
            causal = torch.ones(n, m, dtype=torch.bool, device=query.device).tril(m - n)
            attn_mask = causal if attn_mask is None else (attn_mask & causal if attn_mask.dtype == torch.bool
                                                          else attn_mask.masked_fill(~causal, float("-inf")))
        if impl == "math":
            return _math_attention(query, key, value, attn_mask, scale)
        return attention(query, key, value, attn_mask=attn_mask, scale=scale,
                         impl=impl if attn_mask is None else "torch")

    return sdpa


def _math_attention(q, k, v, mask=None, scale=None):
    """Plain-math attention (materialises N x M): the reference every op of which has an AD rule."""
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return s.softmax(-1) @ v


def _contiguous_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    return _group_norm(input.contiguous(), num_groups, weight, bias, eps)


@contextlib.contextmanager
def jvp_capable(impl: str = "torch"):
    """Patch attention and GroupNorm for forward-mode AD. ``impl``: ``torch`` (memory-efficient),
    ``triton`` (GPU kernel) or ``math`` (plain math attention, the reference)."""
    if impl not in ("torch", "triton", "math"):
        raise ValueError(f"unknown attention-JVP implementation {impl!r}; expected torch, triton or math")
    sdpa = _tangent_sdpa(impl)
    F.scaled_dot_product_attention = sdpa
    F.group_norm = _contiguous_group_norm
    try:
        with nets_attention.use_attention(sdpa):
            yield
    finally:
        F.scaled_dot_product_attention = _sdpa
        F.group_norm = _group_norm


def model_jvp(fn, primals: tuple, tangents: tuple, impl: str = "torch"):
    """``torch.func.jvp(fn, primals, tangents)`` with the model made JVP-capable; returns (out, tangent)."""
    with jvp_capable(impl):
        return torch.func.jvp(fn, primals, tangents)
