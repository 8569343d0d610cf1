"""Softmax attention with a forward-mode tangent (papers/rcm.md section 3, papers/README.md section 6).

For ``S = scale * Q K^T``, ``P = softmax(S)``, ``O = P V`` and tangents ``(dQ, dK, dV)``:

    dS = scale * (dQ K^T + Q dK^T)
    dO = P dV + (P * dS) V - rowsum(P * dS) * O

Three implementations with one contract (inputs (B, H, N, D), keys/values (B, H, M, D), optional
boolean or additive mask broadcastable to (B, H, N, M)):

* :func:`reference_attention_jvp`: plain math, materialises N x M (tests only).
* :func:`attention_jvp`: memory-efficient PyTorch. The primal comes from the fused SDPA kernel
  (with its log-sum-exp on CPU); the tangent streams over key/value blocks, so no N x M tensor
  is ever held. Without a log-sum-exp it runs the online softmax itself (running row max, rescaled
  row sums, output and tangent accumulators), FlashAttention-2 style.
* :mod:`common.kernels.triton_attention_jvp`: the same stream as a Triton kernel, for GPUs.

:func:`attention` wraps these in an ``autograd.Function`` with a ``jvp`` rule (for ``torch.func.jvp``)
and a ``backward`` (the training forward differentiates through the primal output).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

BLOCK_ELEMENTS = 1 << 20  # one (B*H, N_block, M_block) score block: 4 MB in fp32 (stays in L3 with its partners)


def _mask_bias(mask: Tensor | None, dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def reference_attention_jvp(q, k, v, dq, dk, dv, mask=None, scale=None) -> tuple[Tensor, Tensor]:
    """Plain-math attention output and its tangent (materialises the full score matrix)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    bias = _mask_bias(mask, s.dtype)
    if bias is not None:
        s = s + bias
    p = s.softmax(-1)
    o = p @ v
    ds = (dq @ k.transpose(-2, -1) + q @ dk.transpose(-2, -1)) * scale
    pds = p * ds
    do = p @ dv + pds @ v - pds.sum(-1, keepdim=True) * o
    return o, do


def _blocks(total_rows: int, n: int, m: int) -> tuple[int, int]:
    """Query and key block sizes so that one score block stays within BLOCK_ELEMENTS."""
    bm = min(m, 512)
    bn = max(16, min(n, BLOCK_ELEMENTS // max(1, total_rows * bm)))
    return bn, bm


def _lse_cpu(q, k, v, mask, scale):
    """Fused SDPA primal and its per-row log-sum-exp, or None where that kernel does not apply."""
    if q.device.type != "cpu" or mask is not None or q.dtype not in (torch.float32, torch.float64, torch.bfloat16):
        return None
    try:
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)[:2]
    except (RuntimeError, AttributeError):
        return None
    return o, lse


@torch.no_grad()
def attention_forward(q, k, v, mask=None, scale=None) -> tuple[Tensor, Tensor | None]:
    """The primal output (fused SDPA) and, when the kernel provides it, the row log-sum-exp."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    got = _lse_cpu(q, k, v, mask, scale)
    if got is not None:
        return got
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None


@torch.no_grad()
def attention_tangent(q, k, v, o, dq, dk, dv, lse=None, mask=None, scale=None) -> Tensor:
    """dO by streaming over key/value blocks (and query blocks), never holding an N x M tensor.

    Accumulation is in fp32 for low-precision inputs. With ``lse`` (row log-sum-exp of the scores)
    the probabilities are exact per block; without it a running max and rescaled sums are kept.
    """
    if lse is not None and mask is None:
        return _tangent_with_lse(q, k, v, o, dq, dk, dv, lse, q.shape[-1] ** -0.5 if scale is None else scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    *lead, n, d = q.shape
    m = k.shape[-2]
    rows = math.prod(lead)
    bn, bm = _blocks(rows, n, m)
    bias = _mask_bias(mask, acc_dtype)
    qdq = torch.cat([q, dq], -1).to(acc_dtype)  # [Q dQ] [dK K]^T = Q dK^T + dQ K^T in one matmul
    kdk_t = torch.cat([dk, k], -1).to(acc_dtype).transpose(-2, -1)
    kt = k.to(acc_dtype).transpose(-2, -1)
    v_, dv_ = v.to(acc_dtype), dv.to(acc_dtype)
    out = torch.empty(q.shape, dtype=acc_dtype, device=q.device)
    for i in range(0, n, bn):
        qi = q[..., i:i + bn, :].to(acc_dtype)
        qdqi = qdq[..., i:i + bn, :]
        oi = o[..., i:i + bn, :].to(acc_dtype)
        acc = torch.zeros(qi.shape[:-1] + (d,), dtype=acc_dtype, device=q.device)
        mu = torch.zeros(qi.shape[:-1] + (1,), dtype=acc_dtype, device=q.device)
        run_max = torch.full_like(mu, float("-inf"))
        run_sum = torch.zeros_like(mu)
        for j in range(0, m, bm):
            s = (qi @ kt[..., j:j + bm]).mul_(scale)
            if bias is not None:
                s.add_(bias[..., i:i + bn, j:j + bm])
            ds = (qdqi @ kdk_t[..., j:j + bm]).mul_(scale)
            # online softmax: rescale what was accumulated under the old row max
            new_max = torch.maximum(run_max, s.amax(-1, keepdim=True))
            safe = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            alpha = torch.exp(run_max - safe)
            p = s.sub_(safe).exp_()
            run_sum.mul_(alpha).add_(p.sum(-1, keepdim=True))
            acc.mul_(alpha)
            mu.mul_(alpha)
            run_max = new_max
            pds = ds.mul_(p)
            acc.add_(p @ dv_[..., j:j + bm, :]).add_(pds @ v_[..., j:j + bm, :])
            mu.add_(pds.sum(-1, keepdim=True))
        inv = torch.where(run_sum > 0, 1 / run_sum, torch.zeros_like(run_sum))
        out[..., i:i + bn, :] = acc * inv - (mu * inv) * oi
    return out.to(q.dtype)


def _flat_inputs(q, k, v, dq, dk, dv, acc_dtype):
    """(rows, len, dim) views in the accumulation dtype, with the concatenations the streams use:
    ``[Q dQ] [dK K]^T = Q dK^T + dQ K^T`` in one matmul, ``[V 1]`` for row sums inside matmuls."""
    rows = math.prod(q.shape[:-2])
    flat = lambda t: t.reshape(rows, t.shape[-2], t.shape[-1]).to(acc_dtype)  # noqa: E731
    q_, k_, v_, dv_ = flat(q), flat(k), flat(v), flat(dv)
    ones = torch.ones(rows, k.shape[-2], 1, dtype=acc_dtype, device=q.device)
    return (q_, torch.cat([q_, flat(dq)], -1), k_.transpose(1, 2), torch.cat([flat(dk), k_], -1).transpose(1, 2),
            v_, dv_, ones)


def _tangent_with_lse(q, k, v, o, dq, dk, dv, lse, scale) -> Tensor:
    """The tangent with exact probabilities ``p = exp(scale Q K^T - lse)`` (``- lse`` folded into the
    score matmul), ``rowsum(P * dS)`` folded into ``(P * dS) [V 1]`` and the scale of dS applied
    once to that accumulator: two elementwise passes over each score block."""
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    *lead, n, d = q.shape
    rows, m = math.prod(lead), k.shape[-2]
    bn, bm = _blocks(rows, n, m)
    q_, qdq, kt, kdk_t, v_, dv_, ones = _flat_inputs(q, k, v, dq, dk, dv, acc_dtype)
    v1 = torch.cat([v_, ones], -1)
    neg_lse = -lse.reshape(rows, n, 1).to(acc_dtype)
    o_ = o.reshape(rows, n, d).to(acc_dtype)
    out = torch.empty(rows, n, d, dtype=acc_dtype, device=q.device)
    for i in range(0, n, bn):
        nb = min(bn, n - i)
        pdv = torch.zeros(rows, nb, d, dtype=acc_dtype, device=q.device)
        t = torch.zeros(rows, nb, d + 1, dtype=acc_dtype, device=q.device)  # [(P*dS/scale) V, rowsum]
        for j in range(0, m, bm):
            p = torch.baddbmm(neg_lse[:, i:i + bn], q_[:, i:i + bn], kt[:, :, j:j + bm], alpha=scale).exp_()
            pds = torch.bmm(qdq[:, i:i + bn], kdk_t[:, :, j:j + bm]).mul_(p)
            pdv.baddbmm_(p, dv_[:, j:j + bm])
            t.baddbmm_(pds, v1[:, j:j + bm])
        t.mul_(scale)
        out[:, i:i + bn] = pdv + t[..., :d] - t[..., d:] * o_[:, i:i + bn]
    return out.reshape(q.shape).to(q.dtype)


def _fused_jvp(q, k, v, dq, dk, dv, scale) -> tuple[Tensor, Tensor]:
    """O and dO in one stream (FlashAttention-2 style online softmax): ``P [V dV]`` accumulates the
    output and ``P dV`` in one matmul, ``(P * dS) V`` the rest; 12 N M d flops against 4 N M d for a
    plain attention forward."""
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    *lead, n, d = q.shape
    rows, m = math.prod(lead), k.shape[-2]
    bn, bm = _blocks(rows, n, m)
    q_, qdq, kt, kdk_t, v_, dv_, _ = _flat_inputs(q, k, v, dq, dk, dv, acc_dtype)
    vdv = torch.cat([v_, dv_], -1)
    zero = torch.zeros(1, 1, 1, dtype=acc_dtype, device=q.device)  # baddbmm input, ignored with beta=0
    o = torch.empty(rows, n, d, dtype=acc_dtype, device=q.device)
    do = torch.empty(rows, n, d, dtype=acc_dtype, device=q.device)
    for i in range(0, n, bn):
        nb = min(bn, n - i)
        a = torch.zeros(rows, nb, 2 * d, dtype=acc_dtype, device=q.device)  # [P V, P dV]
        t = torch.zeros(rows, nb, d, dtype=acc_dtype, device=q.device)  # (P * dS / scale) V
        l = torch.zeros(rows, nb, 1, dtype=acc_dtype, device=q.device)  # rowsum P
        mu = torch.zeros(rows, nb, 1, dtype=acc_dtype, device=q.device)  # rowsum P * dS / scale
        run_max = torch.full((rows, nb, 1), float("-inf"), dtype=acc_dtype, device=q.device)
        for j in range(0, m, bm):
            s = torch.baddbmm(zero, q_[:, i:i + bn], kt[:, :, j:j + bm], beta=0, alpha=scale)  # scale in the gemm
            new_max = torch.maximum(run_max, s.amax(-1, keepdim=True))
            alpha = torch.exp(run_max - new_max)
            p = s.sub_(new_max).exp_()
            pds = torch.bmm(qdq[:, i:i + bn], kdk_t[:, :, j:j + bm]).mul_(p)
            a.mul_(alpha).baddbmm_(p, vdv[:, j:j + bm])
            t.mul_(alpha).baddbmm_(pds, v_[:, j:j + bm])
            l.mul_(alpha).add_(p.sum(-1, keepdim=True))
            mu.mul_(alpha).add_(pds.sum(-1, keepdim=True))
            run_max = new_max
        inv = 1 / l
        oi = a[..., :d] * inv
        o[:, i:i + bn] = oi
        do[:, i:i + bn] = (a[..., d:] + scale * t) * inv - (scale * mu * inv) * oi
    return o.reshape(q.shape).to(q.dtype), do.reshape(q.shape).to(q.dtype)


@torch.no_grad()
def attention_jvp(q, k, v, dq, dk, dv, mask=None, scale=None) -> tuple[Tensor, Tensor]:
    """Memory-efficient (O, dO). Without a mask: one fused stream for both; with a mask: the fused
    SDPA primal, then the streamed tangent."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if mask is None:
        return _fused_jvp(q, k, v, dq, dk, dv, scale)
    o, lse = attention_forward(q, k, v, mask, scale)
    return o, attention_tangent(q, k, v, o, dq, dk, dv, lse, mask, scale)


def _zeros_if_none(t, like):
    return torch.zeros_like(like) if t is None else t


class _TangentAttention(torch.autograd.Function):
    """Attention with a forward-mode rule (jvp) and a reverse-mode rule (backward)."""

    @staticmethod
    def forward(q, k, v, mask, scale, impl):
        o, lse = attention_forward(q, k, v, mask, scale)
        return o, lse if lse is not None else torch.empty(0, device=q.device)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, scale, impl = inputs
        o, lse = output
        ctx.scale, ctx.impl, ctx.has_lse = scale, impl, lse.numel() > 0
        ctx.mask = mask
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v, o, lse)
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def jvp(ctx, dq, dk, dv, _dmask, _dscale, _dimpl):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _zeros_if_none(dq, q), _zeros_if_none(dk, k), _zeros_if_none(dv, v)
        if ctx.impl == "triton":
            from common.kernels.triton_attention_jvp import triton_attention_jvp

            return triton_attention_jvp(q, k, v, dq, dk, dv, scale=ctx.scale)[1], None
        return attention_tangent(q, k, v, o, dq, dk, dv, lse if ctx.has_lse else None, ctx.mask, ctx.scale), None

    @staticmethod
    def backward(ctx, go, _glse):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=ctx.mask, scale=ctx.scale)
            gq, gk, gv = torch.autograd.grad(o, (qq, kk, vv), go)
        return gq, gk, gv, None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, scale: float | None = None,
              impl: str = "torch") -> Tensor:
    """Softmax attention that ``torch.func.jvp`` and autograd can both pass through.

    ``impl``: ``torch`` (streamed PyTorch tangent) or ``triton`` (the Triton kernel, no mask).
    """
    if impl not in ("torch", "triton"):
        raise ValueError(f"unknown attention-JVP implementation {impl!r}; expected 'torch' or 'triton'")
    if impl == "triton" and attn_mask is not None:
        raise ValueError("the Triton attention-JVP kernel takes no attention mask; use impl='torch'")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _TangentAttention.apply(q, k, v, attn_mask, scale, impl)[0]
