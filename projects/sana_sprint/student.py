"""SANA-Sprint's student network (sana_sprint.md section 3): the teacher's network plus the two modules
the student adds, both starting at zero so the student starts as the teacher exactly:

- the guidance input: a timestep-style MLP on ``guidance_scale * w`` added to the time embedding
  (the embedded DiT's ``embed`` input; a diffusers ``SanaTransformer2DModel`` is rebuilt with
  ``guidance_embeds=True``, the teacher's weights loaded into it, and its guidance embedder zeroed);
- the adaptive-weighting head: ``logvar(t) = Linear(sinusoidal(1000 t / (pi / 2)))``, one scalar per
  sample from Fourier features of the TrigFlow time (EDM2's form of sCM's "Linear on the time
  embedding"), clamped to [-10, 10] (pitfall 10).

The condition is a dict ``{"c": labels or text embeddings, "w": (B,) guidance}``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from common.config import ConfigError
from common.nets.dit import DiT, timestep_embedding
from common.teachers.hub import DiffusersNet

LOGVAR_CLAMP = 10.0


def _with_guidance_embeds(model: nn.Module) -> nn.Module:
    """A copy of a diffusers ``SanaTransformer2DModel`` with a guidance embedder, carrying its weights
    (AdaLayerNormSingle's ``time_embed.emb.timestep_embedder`` is the combined embedding's
    ``time_embed.timestep_embedder``); the new guidance embedder's output layer starts at zero."""
    cfg = dict(model.config)
    if cfg.get("guidance_embeds"):
        return model
    new = type(model).from_config({**cfg, "guidance_embeds": True})
    state = {k.replace("time_embed.emb.", "time_embed."): v for k, v in model.state_dict().items()}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("time_embed.guidance_embedder.") for k in missing):
        raise RuntimeError(f"guidance-embedding copy of {type(model).__name__}: missing {missing}, "
                           f"unexpected {unexpected}")
    nn.init.zeros_(new.time_embed.guidance_embedder.linear_2.weight)
    nn.init.zeros_(new.time_embed.guidance_embedder.linear_2.bias)
    return new.to(next(model.parameters()).dtype)


class SprintStudent(nn.Module):
    """``net(x, t, {"c": c, "w": w})`` for a copy ``net`` of the teacher; ``logvar(t)`` (B,)."""

    def __init__(self, net: nn.Module, guidance_scale: float = 0.1):
        super().__init__()
        self.guidance_scale = guidance_scale
        if isinstance(net, DiT):
            self.kind = "dit"
            self.cfg_embed = nn.Sequential(nn.Linear(256, net.dim), nn.SiLU(), nn.Linear(net.dim, net.dim))
            nn.init.zeros_(self.cfg_embed[-1].weight)
            nn.init.zeros_(self.cfg_embed[-1].bias)
        elif isinstance(net, DiffusersNet) and net.kind == "SanaTransformer2DModel":
            self.kind = "diffusers"
            net.model = _with_guidance_embeds(net.model)
        else:
            raise ConfigError(f"SANA-Sprint's guidance input is wired for the embedded DiT and SanaTransformer2DModel, "
                              f"not {getattr(net, 'kind', type(net).__name__)}")
        self.net = net
        self.logvar_head = nn.Linear(256, 1)
        nn.init.zeros_(self.logvar_head.weight)
        nn.init.zeros_(self.logvar_head.bias)
        # what samplers and evaluators read off a network
        for k in ("image_size", "in_channels", "num_classes", "dim"):
            if hasattr(net, k):
                setattr(self, k, getattr(net, k))

    def forward(self, x: Tensor, t: Tensor, cond: dict, return_features: list[str] | None = None) -> Tensor:
        if not isinstance(cond, dict) or set(cond) != {"c", "w"}:
            raise TypeError("SANA-Sprint's student takes the condition {'c': ..., 'w': guidance (B,)}")
        w = torch.as_tensor(cond["w"], device=x.device, dtype=x.dtype).expand(x.shape[0]) * self.guidance_scale
        kw = {"return_features": return_features} if return_features else {}
        if self.kind == "dit":
            return self.net(x, t, cond["c"], embed=self.cfg_embed(timestep_embedding(w, 256).to(x.dtype)), **kw)
        return self.net(x, t, cond["c"], guidance=w, **kw)

    def logvar(self, t: Tensor) -> Tensor:
        """The adaptive weighting's ``logvar`` at TrigFlow times ``t`` (B,)."""
        feats = timestep_embedding(t.float() * (1000.0 / (math.pi / 2)), 256)
        return self.logvar_head(feats.to(self.logvar_head.weight.dtype)).squeeze(-1).clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)


class WithGuidance(nn.Module):
    """A student Denoiser seen as a plain one: ``den(x, t, c)`` calls it with the guidance input fixed at
    ``w`` (sampling: no external CFG, 1 NFE a step)."""

    def __init__(self, denoiser, w: float):
        super().__init__()
        self.denoiser, self.w = denoiser, float(w)
        self.convention, self.prediction = denoiser.convention, denoiser.prediction
        self.null_label = getattr(denoiser, "null_label", None)

    @property
    def net(self):
        return self.denoiser.net

    def forward(self, x: Tensor, t: Tensor, cond):
        return self.denoiser(x, t, {"c": cond, "w": torch.full((x.shape[0],), self.w, device=x.device)})

    def level(self, t):
        return self.denoiser.level(t)

    def null_cond(self, cond):
        return self.denoiser.null_cond(cond)
