import pytest
import torch

from common import noise
from common.critics.dsm import dsm_loss, dsm_weight
from common.distill_losses import dmd_gradient, surrogate_loss, vsd_gradient


@pytest.mark.parametrize("reduction,scale", [("sum", 1.0), ("mean", 1 / 24), ("per_sample_sum", 1 / 2)])
def test_surrogate_backpropagates_exactly_g(reduction, scale):
    x = torch.randn(2, 3, 4, requires_grad=True)
    g = torch.randn(2, 3, 4)
    surrogate_loss(x, g, reduction).backward()
    torch.testing.assert_close(x.grad, g * scale)


def test_dmd_and_vsd_gradients_point_the_same_way():
    """eps = (x - a x0)/b, so b^2 (eps_real - eps_fake) = a b (x0_fake - x0_real): same direction as DMD."""
    g = torch.Generator().manual_seed(0)
    x0r, x0f, x = (torch.randn(3, 5, generator=g) for _ in range(3))
    lv = noise.RectifiedFlow().level(torch.tensor([0.2, 0.5, 0.8]))
    eps_r = (x - lv.a[:, None] * x0r) / lv.b[:, None]
    eps_f = (x - lv.a[:, None] * x0f) / lv.b[:, None]
    v = vsd_gradient(eps_r, eps_f, lv.b)
    torch.testing.assert_close(v, (lv.a * lv.b)[:, None] * (x0f - x0r))
    d = dmd_gradient(x0f, x0r, x)
    w = (x - x0r).abs().mean(1, keepdim=True)
    torch.testing.assert_close(d, (x0f - x0r) / w)
    assert torch.isfinite(dmd_gradient(x0f, x0r * float("nan"), x)).all()


def test_dsm_eps_mse_is_snr_times_x0_mse():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    t = torch.tensor([0.3, 0.5, 0.7, 0.9])
    conv = noise.RectifiedFlow()
    lv = conv.level(t)
    x_t = conv.add_noise(x0, eps, t)
    pred = torch.randn(4, 6, generator=g)  # an arbitrary flow prediction
    per_x0 = [dsm_loss(pred[i:i + 1], x0[i:i + 1], eps[i:i + 1], x_t[i:i + 1], conv.level(t[i:i + 1]), "flow", "x0")
              for i in range(4)]
    per_eps = [dsm_loss(pred[i:i + 1], x0[i:i + 1], eps[i:i + 1], x_t[i:i + 1], conv.level(t[i:i + 1]), "flow", "eps")
               for i in range(4)]
    for i in range(4):
        torch.testing.assert_close(per_eps[i], (lv.a[i] / lv.b[i]) ** 2 * per_x0[i])
    # inv_b2 on a flow level is the teacher's own loss, the velocity MSE
    u_mse = (pred - (eps - x0)).pow(2).flatten(1).mean(1).mean()
    torch.testing.assert_close(dsm_loss(pred, x0, eps, x_t, lv, "flow", "x0", "inv_b2"), u_mse)
    # weightings: alpha_bar and 1/sin^2 on a VP level, EDM's (sigma^2 + sd^2)/(sigma sd)^2
    vp = noise.TrigFlow(1.0).level(torch.tensor([0.4]))
    torch.testing.assert_close(dsm_weight("alpha_bar", vp), torch.cos(torch.tensor([0.4])) ** 2)
    torch.testing.assert_close(dsm_weight("inv_sin2", vp), 1 / torch.sin(torch.tensor([0.4])) ** 2)
    ve = noise.EDM().level(torch.tensor([2.0]))
    torch.testing.assert_close(dsm_weight("edm", ve, 0.5), torch.tensor([(4 + 0.25) / (4 * 0.25)]))
    with pytest.raises(ValueError, match="unknown DSM weighting"):
        dsm_weight("snr", vp)
