"""A small class-conditional diffusion transformer (DiT with adaLN-single conditioning).

Architecture only: the time convention and the time-embedding scale live in the Denoiser
wrapper (common/teachers). Attention goes through :func:`common.nets.attention.attention`,
real softmax attention that the JVP entry point can reroute.
"""
from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from common.nets.attention import attention


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of a (B,) time already scaled by the wrapper (e.g. 1000 s)."""
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)  # at least fp32; fp64 stays fp64
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, h: int, w: int) -> Tensor:
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    out = [f(g.reshape(-1)[:, None] * omega[None]) for g in (gy, gx) for f in (torch.sin, torch.cos)]
    return torch.cat(out, dim=1)  # (h*w, dim)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_B_N_D: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv(x_B_N_D), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        o = attention(q, k, v)
        return self.proj(rearrange(o, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block modulated by a shared adaLN vector plus a per-block table."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(self, x: Tensor, mod_B_6_D: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod_B_6_D + self.scale_shift_table[None]).unbind(1)
        h = self.norm1(x) * (1 + scale1[:, None]) + shift1[:, None]
        x = x + gate1[:, None] * self.attn(h)
        h = self.norm2(x) * (1 + scale2[:, None]) + shift2[:, None]
        return x + gate2[:, None] * self.mlp(h)


class DiT(nn.Module):
    """Input (B, C, H, W), time (B,) already scaled, class labels (B,) with ``num_classes`` as the
    null label for classifier-free guidance. Output has the input's shape.

    ``forward(..., return_features=["block3", ...])`` also returns the named blocks' tokens;
    ``embed`` (B, dim), when given, is added to the time and label embedding (a student's extra
    conditioning, e.g. SANA-Sprint's guidance embedding).
    """

    def __init__(self, image_size: int = 32, in_channels: int = 1, patch_size: int = 4, dim: int = 192,
                 depth: int = 6, heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 10):
        super().__init__()
        self.image_size, self.in_channels, self.patch_size = image_size, in_channels, patch_size
        self.num_classes = num_classes
        self.grid = image_size // patch_size
        self.patch_embed = nn.Linear(in_channels * patch_size**2, dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, self.grid, self.grid)[None], persistent=False)
        self.t_embed = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embed = nn.Embedding(num_classes + 1, dim)  # last row: the null label
        self.adaln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.dim = dim  # the width of the tokens return_features gives
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.out_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.out = nn.Linear(dim, in_channels * patch_size**2)
        self._init()

    def _init(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.zeros_(self.adaln[-1].weight)
        nn.init.zeros_(self.adaln[-1].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_B_C_H_W: Tensor, t_B: Tensor, y_B: Tensor, return_features: list[str] | None = None,
                embed: Tensor | None = None):
        p = self.patch_size
        h = rearrange(x_B_C_H_W, "b c (gh p1) (gw p2) -> b (gh gw) (c p1 p2)", p1=p, p2=p)
        h = self.patch_embed(h) + self.pos_embed
        c = self.t_embed(timestep_embedding(t_B, 256).to(h.dtype)) + self.y_embed(y_B)
        if embed is not None:
            c = c + embed.to(c.dtype)
        mod = self.adaln(c).unflatten(1, (6, -1))
        feats = {}
        for i, blk in enumerate(self.blocks):
            h = blk(h, mod)
            if return_features and f"block{i}" in return_features:
                feats[f"block{i}"] = h
        shift, scale = (self.out_table[None] + c[:, None]).unbind(1)
        h = self.out(self.norm_out(h) * (1 + scale[:, None]) + shift[:, None])
        out = rearrange(h, "b (gh gw) (c p1 p2) -> b c (gh p1) (gw p2)", gh=self.grid, p1=p, p2=p)
        if return_features:
            missing = set(return_features) - set(feats)
            if missing:
                raise KeyError(f"unknown feature names {sorted(missing)}; have block0..block{len(self.blocks) - 1}")
            return out, feats
        return out
