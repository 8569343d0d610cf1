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


def test_sds_objective_uses_the_injected_noise_and_has_no_critic(tiny_teacher):
    """objective=sds: eps_fake is the noise that made x_t, so g = b^2 (eps_real - eps); no critic role."""
    import pytest

    from common.config import ConfigError
    from common.rng import Purpose
    from projects.swiftbrush.method import SwiftBrush

    with pytest.raises(ConfigError, match="objective=sds has no critic"):
        SwiftBrush(teacher=tiny_teacher, objective="sds", schedule=[{"name": "main", "cycle": [["student", "critic"]]}])
    m = SwiftBrush(teacher=tiny_teacher, objective="sds", guidance=1.25, schedule=[{"cycle": [["student"]]}])
    assert m.trainable_roles() == ["student"] and m.den.fake is None
    with pytest.raises(ConfigError, match=r"roles section names \['critic'\]"):
        SwiftBrush(teacher=tiny_teacher, objective="sds", roles={"critic": {"lr": 1e-3}}).check_roles()
    c, pos = torch.tensor([3, 7]), torch.tensor([0, 1])
    step = m.loss_student((c, pos), m.step_context("student", pos))
    # the same draws, by hand
    ctx = m.step_context("student", pos)
    z = ctx.randn(Purpose.LATENT, m.sample_shape)
    s = m._time(ctx.rand(Purpose.TIME), m.hparams.s_min, m.hparams.s_max)
    eps = ctx.randn(Purpose.NOISE, m.sample_shape)
    with torch.no_grad():
        x0 = m.generate(z, c)
        x_s = m.den.student.convention.add_noise(x0, eps, s)
        eps_real = m._teacher_call(x_s, s, c).eps
    g = m.den.student.level(s).b.view(-1, 1, 1, 1) ** 2 * (eps_real - eps)
    torch.testing.assert_close(step.loss.detach(), 0.5 * g.pow(2).mean())
    torch.testing.assert_close(step.logs["student/g_norm"], g.flatten(1).norm(dim=1).mean())
    torch.testing.assert_close(step.outputs["x0"], x0)  # handed to the critic through the context
    assert g.abs().max() > 1e-3  # a real gradient, not a zero that would pass trivially


def test_critic_reads_the_student_samples_of_its_iteration_or_makes_fresh_ones(tiny_teacher):
    """Through the step context: with a student step first, the critic trains on exactly its samples; in an
    iteration without one (a critic-only cycle) it draws fresh samples from the current student."""
    from projects.swiftbrush.method import SwiftBrush

    m = SwiftBrush(teacher=tiny_teacher, guidance=1.25)
    c, pos = torch.tensor([3, 7, 1]), torch.tensor([0, 1, 2])
    seen = []
    orig = m.den.fake.convention.add_noise
    m.den.fake.convention.add_noise = lambda x0, eps, s: (seen.append(x0), orig(x0, eps, s))[1]
    try:
        outputs = {"student": {"x0": torch.full((3, *m.sample_shape), 0.25)}}
        m.loss_critic((c, pos), m.step_context("critic", pos, outputs))
        assert torch.equal(seen[-1], outputs["student"]["x0"])
        m.loss_critic((c, pos), m.step_context("critic", pos, {}))
        assert not seen[-1].requires_grad and (seen[-1] - 0.25).abs().max() > 1e-3
    finally:
        m.den.fake.convention.add_noise = orig
