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


def test_sds_objective_uses_the_injected_noise_and_has_no_critic():
    """objective=sds: eps_fake is the noise that made x_t, so g = b^2 (eps_real - eps); no critic role."""
    import pytest

    from projects.swiftbrush.method import NOISE, TIME, SwiftBrush

    with pytest.raises(ValueError, match="objective=sds has no critic"):
        SwiftBrush(objective="sds", schedule=[{"until": None, "cycle": [["student", "critic"]]}])
    m = SwiftBrush(objective="sds", guidance=1.25, schedule=[{"until": None, "cycle": [["student"]]}])
    assert m.trainable_roles() == ["student"] and m.fake is None
    c, pos = torch.tensor([3, 7]), torch.tensor([0, 1])
    loss, logs = m.loss_student((c, pos), None)
    # the same draws, by hand
    z = m.randn_per_sample(pos, m.sample_shape, NOISE)
    s = m._time(m.rand_per_sample(pos, TIME), m.hparams.s_min, m.hparams.s_max)
    eps = m.randn_per_sample(pos, m.sample_shape, NOISE + 10)
    with torch.no_grad():
        x0 = m.generate(z, c)
        x_s = m.student.convention.add_noise(x0, eps, s)
        eps_real = m._teacher_call(x_s, s, c).eps
    g = m.student.level(s).b.view(-1, 1, 1, 1) ** 2 * (eps_real - eps)
    torch.testing.assert_close(loss.detach(), 0.5 * g.pow(2).mean())
    torch.testing.assert_close(logs["student/g_norm"], g.flatten(1).norm(dim=1).mean())
    assert g.abs().max() > 1e-3  # a real gradient, not a zero that would pass trivially
