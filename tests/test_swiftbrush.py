import torch

from projects.swiftbrush.losses import vsd_generator_loss


def test_vsd_gradient_is_weight_times_score_difference():
    """dL_G/dx0 = w(t) (eps_real - eps_fake) / N with w = b^2 (papers/swiftbrush.md section 4)."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 4, 4, generator=g, requires_grad=True)
    eps_real, eps_fake = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    b = torch.tensor([0.1, 0.5, 0.9])
    loss, grad = vsd_generator_loss(x0, eps_real, eps_fake, b)
    loss.backward()
    expected = b.view(3, 1, 1, 1) ** 2 * (eps_real - eps_fake)
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(x0.grad, expected / x0.numel())
    # descent raises the teacher density: x0 moves along -g, i.e. toward eps_fake - eps_real
    _, g_nan = vsd_generator_loss(x0, eps_real * float("nan"), eps_fake, b)
    assert torch.isfinite(g_nan).all()
