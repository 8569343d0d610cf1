"""Uni-Instruct's special cases reproduce the plain SiD and DMD gradients on identical inputs."""
import pytest
import torch

from projects.uni_instruct.losses import PRESETS, density_ratio, generator_loss


def _setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_g = torch.randn(4, 2, 3, 3, generator=g, requires_grad=True)
    n = torch.randn(4, 2, 3, 3, generator=g)
    A = torch.randn(18, 18, generator=g) * 0.2
    B = torch.randn(18, 18, generator=g) * 0.2
    x_t = x_g + 0.7 * n  # gradient flows through x_t into both predictions

    def net(M):
        return (x_t.flatten(1) @ M).view_as(x_g)

    return x_g, net(A), net(B)


def _plain_sid(x_g, y_r, y_f):  # SiD, alpha = 1: <y_r - y_f, y_f - x_g> / w_f, w_f = mean|x_g - y_r| (stop-grad)
    w = (x_g - y_r).abs().flatten(1).mean(1).detach()
    return (((y_r - y_f) * (y_f - x_g)).flatten(1).sum(1) / w).sum()


def test_rkl_is_sid():
    x_g, y_r, y_f = _setup()
    got = torch.autograd.grad(generator_loss(x_g, y_r, y_f, torch.rand(4), "rkl").sum(), x_g, retain_graph=True)[0]
    want = torch.autograd.grad(_plain_sid(x_g, y_r, y_f), x_g)[0]
    torch.testing.assert_close(got, want)


def test_di_is_dmd():
    x_g, y_r, y_f = _setup(1)
    got = torch.autograd.grad(generator_loss(x_g, y_r, y_f, torch.rand(4), "di").sum(), x_g)[0]
    w = (x_g - y_r).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(got, ((y_f - y_r) / w).detach())


@pytest.mark.parametrize("preset,a,b", [("fkl", 1.0, 0.0), ("jeffrey", 2.0, 0.0), ("chi2", 2.0, 4.0)])
def test_weights_at_ratio_one(preset, a, b):
    r = torch.ones(4)
    assert torch.allclose(PRESETS[preset][0](r), torch.full((4,), a))
    assert torch.allclose(PRESETS[preset][1](r), torch.full((4,), b))
    x_g, y_r, y_f = _setup(2)
    if b == 0:  # with r = 1 these are a times SiD
        got = torch.autograd.grad(generator_loss(x_g, y_r, y_f, r, preset).sum(), x_g, retain_graph=True)[0]
        want = torch.autograd.grad(a * _plain_sid(x_g, y_r, y_f), x_g)[0]
        torch.testing.assert_close(got, want)


def test_ratio_weights_scale_per_sample():
    x_g, y_r, y_f = _setup(3)
    r = torch.tensor([0.5, 1.0, 2.0, 4.0])
    fkl = generator_loss(x_g, y_r, y_f, r, "fkl")
    rkl = generator_loss(x_g, y_r, y_f, r, "rkl")
    torch.testing.assert_close(fkl, r * rkl)


def test_density_ratio_modes():
    logit = torch.tensor([[0.0, 0.0], [1.0, 1.0], [30.0, 30.0]]).view(3, 1, 1, 2)
    torch.testing.assert_close(density_ratio(logit), torch.exp(torch.tensor([0.0, 1.0, 10.0])))
    r = density_ratio(logit, selfnorm=True)
    assert r.mean().item() == pytest.approx(1.0)
    # the code's ratio is ~1 whatever the discriminator says (L >> 1)
    rc = density_ratio(logit, "code_bce", bce_mean=torch.tensor(0.7), chw=1024, w_f=torch.full((3,), 0.5))
    assert torch.allclose(rc, torch.ones(3), atol=2e-3)
