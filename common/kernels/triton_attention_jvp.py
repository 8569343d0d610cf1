"""FlashAttention-2 forward with a tangent, in Triton (the ``kernels`` extra).

One program per (query block, batch x head). It streams over key/value blocks keeping, per row,
the running max ``m``, the rescaled sum ``l``, the output accumulator ``acc = sum p V``, the
tangent accumulator ``tacc = sum p dV + (p * dS) V`` and ``mu = sum p * dS``; at the end
``O = acc / l`` and ``dO = tacc / l - (mu / l) * O`` (see common/kernels/attention_jvp.py).

On CPU it runs only under ``TRITON_INTERPRET=1`` (set before triton is imported), where ``tl.dot``
on bf16 is wrong: test it in fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _attn_jvp_kernel(Q, K, V, DQ, DK, DV, O, DO, LSE, N, M, D, scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = bh * N * D + offs_m[:, None] * D + offs_d[None, :]
    q_mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    q = tl.load(Q + q_ptrs, mask=q_mask, other=0.0)
    dq = tl.load(DQ + q_ptrs, mask=q_mask, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    mu = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    tacc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, M, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_ptrs = bh * M * D + offs_n[:, None] * D + offs_d[None, :]
        kv_mask = (offs_n[:, None] < M) & (offs_d[None, :] < D)
        k = tl.load(K + kv_ptrs, mask=kv_mask, other=0.0)
        dk = tl.load(DK + kv_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(V + kv_ptrs, mask=kv_mask, other=0.0)
        dv = tl.load(DV + kv_ptrs, mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            ds = (tl.dot(dq, tl.trans(k), input_precision="ieee")
                  + tl.dot(q, tl.trans(dk), input_precision="ieee")) * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale
            ds = (tl.dot(dq, tl.trans(k)) + tl.dot(q, tl.trans(dk))) * scale
        s = tl.where(offs_n[None, :] < M, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        pds = p * ds
        l_i = l_i * alpha + tl.sum(p, 1)
        mu = mu * alpha + tl.sum(pds, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            tacc = tacc * alpha[:, None] + tl.dot(p, dv, input_precision="ieee") \
                + tl.dot(pds, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            tacc = tacc * alpha[:, None] + tl.dot(p.to(v.dtype), dv) + tl.dot(pds.to(v.dtype), v)
        m_i = m_new
    o = acc / l_i[:, None]
    do = tacc / l_i[:, None] - (mu / l_i)[:, None] * o
    tl.store(O + q_ptrs, o.to(O.dtype.element_ty), mask=q_mask)
    tl.store(DO + q_ptrs, do.to(DO.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh * N + offs_m, m_i + tl.log(l_i), mask=offs_m < N)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A kernel launch needs real storage: unwrap torch.func's wrapper tensors (inside a jvp rule
    the transform level is already popped, so the values are the primal ones)."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t):
        t = f.get_unwrapped(t)
    return t


def triton_attention_jvp(q, k, v, dq, dk, dv, scale=None, block_m: int | None = None, block_n: int | None = None):
    """(O, dO) for (B, H, N, D) queries and (B, H, M, D) keys/values; no mask."""
    q, k, v, dq, dk, dv = (_plain(t) for t in (q, k, v, dq, dk, dv))
    with torch._C._DisableFuncTorch():  # new tensors must not be re-wrapped at the jvp level
        return _launch(q, k, v, dq, dk, dv, scale, block_m, block_n)


def _launch(q, k, v, dq, dk, dv, scale, block_m, block_n):
    *lead, n, d = q.shape
    m = k.shape[-2]
    scale = d**-0.5 if scale is None else scale
    interp = q.device.type == "cpu"
    block_m = block_m or (16 if interp else 64)
    block_n = block_n or (16 if interp else 64)
    block_d = max(16, triton.next_power_of_2(d))
    flat = [t.reshape(-1, t.shape[-2], d).contiguous() for t in (q, k, v, dq, dk, dv)]
    bh = flat[0].shape[0]
    o = torch.empty_like(flat[0])
    do = torch.empty_like(flat[0])
    lse = torch.empty(bh, n, dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(n, block_m), bh)
    _attn_jvp_kernel[grid](*flat, o, do, lse, n, m, d, scale, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                           IEEE=q.dtype == torch.float32)
    return o.reshape(q.shape), do.reshape(q.shape)
