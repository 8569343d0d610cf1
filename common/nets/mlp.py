"""A small time- and class-conditional MLP for the 2-D toys (architecture only)."""
from __future__ import annotations

from torch import Tensor, nn

from common.nets.dit import timestep_embedding


class MLP(nn.Module):
    def __init__(self, in_dim: int = 2, hidden: int = 256, depth: int = 4, num_classes: int = 0):
        super().__init__()
        self.in_dim, self.num_classes = in_dim, num_classes
        self.t_embed = nn.Sequential(nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(in_dim, hidden)
        self.layers = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, in_dim))

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None, return_features=None) -> Tensor:
        c = self.t_embed(timestep_embedding(t, 64).to(x.dtype))
        if self.y_embed is not None and y is not None:
            c = c + self.y_embed(y)
        h = self.inp(x) + c
        feats = {}
        for i, layer in enumerate(self.layers):
            h = h + layer(h)
            feats[f"block{i}"] = h
        out = self.out(h)
        return (out, {k: feats[k] for k in return_features}) if return_features else out
