"""Call a Denoiser in another time convention (papers/README.md section 1).

``ConventionAdapter(den, EDM())`` behaves like an EDM x0-denoiser ``D(x; sigma)`` built on, for
example, a rectified-flow teacher: a sample ``(x, t)`` of the new convention is mapped to the
teacher's by SNR matching (``x_src = (b_src / b_dst) x``), the teacher predicts there, and its
``(x0, eps)`` are returned rescaled to the new convention's data units.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from common import noise
from common.teachers.denoiser import Prediction


class ConventionAdapter(nn.Module):
    def __init__(self, denoiser, convention: noise.Convention):
        super().__init__()
        self.denoiser, self.convention = denoiser, convention
        self.prediction = "x0"
        self.null_label = getattr(denoiser, "null_label", None)

    @property
    def net(self):
        return self.denoiser.net

    def level(self, t) -> noise.NoiseLevel:
        return self.convention.level(t)

    def null_cond(self, cond):
        return self.denoiser.null_cond(cond)

    def x0_eps(self, x: Tensor, t: Tensor, cond, return_features=None):
        t = torch.as_tensor(t, device=x.device, dtype=torch.float64).expand(x.shape[0])
        x_src, t_src = noise.convert_sample(x, t, self.convention, self.denoiser.convention)
        t_src = t_src.to(x.dtype)
        out = self.denoiser(x_src, t_src, cond, return_features=return_features) if return_features \
            else self.denoiser(x_src, t_src, cond)
        raw, feats = out if return_features else (out, None)
        x0, eps = noise.to_x0_eps(self.denoiser.prediction, raw, x_src, self.denoiser.level(t_src))
        scale = self.convention.data_scale / self.denoiser.convention.data_scale
        p = Prediction(x0 * scale, eps)
        return (p, feats) if return_features else p

    def forward(self, x: Tensor, t: Tensor, cond):
        return self.x0_eps(x, t, cond).x0

    def predict(self, x: Tensor, t: Tensor, cond, kind: str = "x0") -> Tensor:
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(x.shape[0])
        p = self.x0_eps(x, t, cond)
        return noise.from_x0_eps(kind, p.x0, p.eps, self.level(t))
