"""The one attention call every embedded network makes.

``attention(q, k, v)`` with (B, H, N, D) tensors is softmax attention. By default it is
``F.scaled_dot_product_attention``; :func:`use_attention` swaps the implementation (for example
the tangent-aware kernels of common/kernels, which torch.func.jvp can pass through).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch.nn.functional as F
from torch import Tensor

_impl: Callable[[Tensor, Tensor, Tensor], Tensor] = F.scaled_dot_product_attention


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return _impl(q, k, v)


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Plain softmax(q k^T / sqrt(d)) v; every op has forward- and reverse-mode rules."""
    w = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return w.softmax(-1) @ v


@contextlib.contextmanager
def use_attention(fn: Callable[[Tensor, Tensor, Tensor], Tensor]):
    global _impl
    prev, _impl = _impl, fn
    try:
        yield
    finally:
        _impl = prev
