"""SwiftBrush losses (papers/swiftbrush.md section 4), pure functions of tensors."""
from __future__ import annotations

from torch import Tensor

from common import noise
from common.critics.dsm import dsm_loss
from common.distill_losses import surrogate_loss, vsd_gradient


def vsd_generator_loss(x0: Tensor, eps_real: Tensor, eps_fake: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Step 2: ``g = nan_to_num(w(t) (eps_real - eps_fake))`` with ``w = b^2`` (sigma_t^2 for VP, s^2 for
    flow); ``L_G = 1/2 mean (x0 - sg(x0 - g))^2`` so ``dL_G/dx0 = g / N``. Returns (loss, g)."""
    g = vsd_gradient(eps_real, eps_fake, b)
    return surrogate_loss(x0, g, "mean"), g


def fake_score_loss(pred: Tensor, x0: Tensor, eps: Tensor, x_t: Tensor, level: noise.NoiseLevel, kind: str,
                    weight: str = "uniform") -> Tensor:
    """Step 3: ``mean lambda(t') ||eps_psi(x'_t, t', c') - eps'||^2``; ``uniform`` (paper) or
    ``alpha_bar`` (official code)."""
    return dsm_loss(pred, x0, eps, x_t, level, kind, form="eps", weighting=weight)
