"""DMD2 (projects/dmd2) on a tiny random teacher: the step draw, the backward simulation, the DMD
term's gradient, the GAN term's route, the critic's sample, and the checks on the student's times."""
import dataclasses
from pathlib import Path

import pytest
import torch

from common.config import ConfigError
from common.rng import Purpose
from projects.dmd2.method import DMD2

SCHEDULE = [{"name": "main", "cycle": [["critic", "discriminator"], ["student", "critic", "discriminator"]]}]


def _module(tiny_teacher, **kw):
    torch.manual_seed(0)
    return DMD2(teacher=tiny_teacher, **{"schedule": SCHEDULE, **kw})


def _batch(m, n=6, start=0):
    g = torch.Generator().manual_seed(start)
    return (torch.rand(n, *m.sample_shape, generator=g) * 2 - 1, torch.arange(start, start + n) % 10,
            torch.arange(start, start + n))


def _ctx(m, role, batch, it, outputs=None):
    return dataclasses.replace(m.step_context(role, batch[2], outputs), iteration=it)


def _moved(m, role, std=0.05):
    """A role's network moved off the tiny teacher (whose zero-initialised output layers predict 0)."""
    with torch.no_grad():
        for p in m.roles[role].net.parameters():
            p.add_(std * torch.randn_like(p))


def test_per_batch_draws_one_step_for_every_sample_and_rank_per_sample_one_each(tiny_teacher):
    m = _module(tiny_teacher)
    a, b = _batch(m, 6, 0), _batch(m, 6, 100)  # two ranks' batches of one iteration
    ks = [m._steps(_ctx(m, "student", a, it), a[2]) for it in range(40)]
    assert all((k == k[0]).all() for k in ks)
    assert all(torch.equal(m._steps(_ctx(m, "student", b, it), b[2]), k) for it, k in enumerate(ks))
    assert {int(k[0]) for k in ks} == {0, 1, 2, 3}
    m.hparams.step_sampling = "per_sample"
    k = m._steps(_ctx(m, "student", _batch(m, 64), 0), torch.arange(64))
    assert len(set(k.tolist())) == 4


def test_the_backward_simulation_starts_from_noise_and_runs_k_student_steps(tiny_teacher):
    m = _module(tiny_teacher)
    _moved(m, "student")
    b = _batch(m)
    ctx = _ctx(m, "student", b, 3)
    times = torch.tensor(m.times)
    k = torch.tensor([0, 1, 2, 3, 1, 0])
    x, t = m.backward_simulation(b[1], k, ctx, b[2])
    torch.testing.assert_close(t, times[k])
    z = ctx.randn(Purpose.LATENT, m.sample_shape, b[2])
    torch.testing.assert_close(x[k == 0], z[k == 0])  # pure noise at s = 1 (b = 1)
    with torch.no_grad():  # one step by hand for the k = 1 samples: x0 = x - s u of the velocity net at s = 1
        x0 = z - m.roles["student"].net(z, 1000 * times[0].expand(6), b[1])
        one = m.noise_convention.add_noise(x0, ctx.randn(Purpose.EXTRA + 1, m.sample_shape, b[2]), times[1].expand(6))
    torch.testing.assert_close(x[k == 1], one[k == 1])
    # a sample's input does not depend on the other samples' steps (masked or whole-batch branch)
    for j in range(4):
        xj, _ = m.backward_simulation(b[1], torch.full((6,), j), ctx, b[2])
        torch.testing.assert_close(x[k == j], xj[k == j])


def test_the_dmd_gradient_is_zero_against_itself_and_g_over_n_otherwise(tiny_teacher):
    m = _module(tiny_teacher, guidance=1.0, gan=False, schedule=[{"name": "main", "cycle": [["critic", "student"]]}])
    b = _batch(m)
    ctx = _ctx(m, "student", b, 1)
    x0 = torch.randn(6, *m.sample_shape, requires_grad=True)
    loss, g_norm = m.dmd_term(x0, b[1], ctx, b[2])  # the critic is still the unguided teacher: no signal
    assert loss.shape == g_norm.shape == (6,)
    loss.mean().backward()
    assert float(g_norm.max()) == 0.0 and float(x0.grad.abs().max()) == 0.0
    _moved(m, "critic")
    x0.grad = None
    loss, g_norm = m.dmd_term(x0, b[1], ctx, b[2])
    loss.mean().backward()
    assert float(g_norm.min()) > 0
    # the surrogate's gradient is g / N; g = (x0_fake - x0_real) / mean|x0 - x0_real| at the drawn tau
    tau = m._draw_time(ctx, b[2], Purpose.TIME, "dmd_range")
    assert (tau >= 0.02).all() and (tau <= 0.98).all()
    x_tau = m.noise_convention.add_noise(x0.detach(), ctx.randn(Purpose.NOISE, m.sample_shape, b[2]), tau)
    with torch.no_grad():
        real, fake = m.den.teacher.predict(x_tau, tau, b[1]), m.den.fake.predict(x_tau, tau, b[1])
    w = (x0.detach() - real).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(x0.grad, (fake - real) / w / x0.numel())


def test_the_student_turn_reaches_the_student_only_and_its_sample_feeds_the_critic(tiny_teacher):
    m = _module(tiny_teacher)
    _moved(m, "student")
    b = _batch(m)
    step = m.loss_student(b, _ctx(m, "student", b, 1))
    torch.testing.assert_close(step.loss, step.logs["student/dmd"] + 5e-3 * step.logs["student/gan"])
    for r in ("critic", "discriminator"):  # what toggling the student's optimizer does to the others
        m.roles[r].net.requires_grad_(False)
    step.loss.backward()
    assert all(p.grad is not None for p in m.roles["student"].net.parameters())
    assert all(p.grad is None for r in ("teacher", "critic", "discriminator") for p in m.roles[r].net.parameters())
    for r in ("critic", "discriminator"):
        m.roles[r].net.requires_grad_(True)
    # the critic's DSM reads the student turn's sample (detached) when there was one, else draws its own
    x0 = step.outputs["x0"]
    assert not x0.requires_grad
    shared = m.loss_critic(b, _ctx(m, "critic", b, 1, {"student": step.outputs}))
    assert shared.outputs["x0"] is x0
    own = m.loss_critic(b, _ctx(m, "critic", b, 0))
    assert not torch.equal(own.outputs["x0"], x0)
    d = m.loss_discriminator(b, _ctx(m, "discriminator", b, 1, {"critic": shared.outputs}))
    assert torch.isfinite(d.loss) and 0 <= float(d.logs["discriminator/real_vs_fake"]) <= 1


def test_the_gan_term_moves_the_sample_against_the_heads(tiny_teacher):
    """One descent step on x0 along the GAN term's gradient lowers that term (the heads' logit rises)."""
    m = _module(tiny_teacher)
    torch.nn.init.normal_(m.roles["discriminator"].net.heads[0].net[-1].weight, std=0.5)  # a head that says something
    b = _batch(m)
    ctx = _ctx(m, "student", b, 1)
    x0 = torch.randn(6, *m.sample_shape, requires_grad=True)
    before = m.gan_term(x0, b[1], ctx, b[2]).mean()
    before.backward()
    with torch.no_grad():
        after = m.gan_term(x0 - 0.05 * x0.grad / x0.grad.norm() * x0.numel() ** 0.5, b[1], ctx, b[2]).mean()
    assert float(after) < before.item()


@pytest.mark.parametrize("times, words", [([0.75, 0.5], "start at the noise end"),
                                          ([1.0, 0.5, 0.75], "strictly decreasing"),
                                          ([1.0, 0.5, -0.1], "outside [0, 1]"), ([], "is empty")])
def test_bad_student_times_are_named_errors(tiny_teacher, times, words):
    with pytest.raises(ConfigError, match="module.student_times") as e:
        _module(tiny_teacher, student_times=times)
    assert words in str(e.value)


def test_bad_noise_ranges_are_named_errors(tiny_teacher):
    with pytest.raises(ConfigError, match=r"module.dmd_range must be \[lo, hi\]"):
        _module(tiny_teacher, dmd_range=[0.9, 0.1])


def test_sdxl_snr_puts_dmd2s_times_at_the_noise_levels_they_name(tiny_teacher):
    from common.dmd import SDXL

    m = _module(tiny_teacher, time_map="sdxl_snr")
    flow = m.noise_convention
    assert m.times[0] == flow.t_noise  # the simulation starts from pure noise
    want = SDXL.level(torch.tensor([749.0, 499.0, 249.0], dtype=torch.float64)).logsnr
    torch.testing.assert_close(flow.level(torch.tensor(m.times[1:], dtype=torch.float64)).logsnr, want)
    # a noise range's ends: DMD2's [0.02 T, 0.98 T] at SDXL's t = 19.98 and 979.02
    ends = m._time(torch.tensor([0.02, 0.98]))
    torch.testing.assert_close(flow.level(ends.double()).logsnr, SDXL.level(torch.tensor([19.98, 979.02],
                                                                                           dtype=torch.float64)).logsnr,
                               rtol=1e-4, atol=1e-4)
    assert _module(tiny_teacher).times == pytest.approx([1.0, 749 / 999, 499 / 999, 249 / 999])


@pytest.mark.parametrize("project, extra", [("dmd2", []),
                                            ("flash_dmd", ["module.rl_mode=step_dpo", "module.rl_start=2"])])
def test_a_fit_never_runs_the_metric_classifier_outside_validation(project, extra, tiny_teacher, tmp_path,
                                                                   monkeypatch):
    """The judge stays out of training (DESIGN.md): with validation off, a short fit (student, critic
    and discriminator turns; Flash-DMD's pixel GAN on its own encoder and its reward stage from
    iteration 2) calls the metric classifier zero times; the counter does see the metric path."""
    from common import runner
    from common.config import load_config
    from common.metrics import evaluator
    from common.metrics.classifier import DigitClassifier

    calls = []
    for name in ("forward", "features"):
        original = getattr(DigitClassifier, name)
        monkeypatch.setattr(DigitClassifier, name,
                            lambda self, x, _f=original, _n=name: calls.append(_n) or _f(self, x))
    cfg = load_config(str(Path(__file__).parents[1] / "projects" / project / "config.yaml"), [
        *extra, f"module.teacher={tiny_teacher}", "validation.steps=[]", "trainer.val_check_interval=1000",
        "data.batch_size=4", "run.iterations=4", "run.ckpt_every=1000", f"run.dir={tmp_path / 'run'}"])
    trainer, module, datamodule, ckpt = runner.build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    assert module.iteration == 4 and module.schedule.steps_per_role(4) == {"critic": 4, "discriminator": 4,
                                                                           "student": 2}
    assert calls == []
    if project == "flash_dmd":  # the reward stage ran: the reference copied at its first student turn
        assert int(module.reference_copied_at) == 3
    evaluator.classify(torch.zeros(2, 1, 32, 32))
    assert calls  # the metric path goes through the counted methods


def test_grad_cosines_are_the_cosine_of_the_two_terms_gradients_at_each_step(tiny_teacher):
    m = _module(tiny_teacher, grad_cos_every=3)
    for r in ("student", "critic"):
        _moved(m, r)
    torch.nn.init.normal_(m.roles["discriminator"].net.heads[0].net[-1].weight, std=0.5)
    b = _batch(m)
    ctx = _ctx(m, "student", b, 3)
    assert m.wants_grad_cosines(ctx) and not m.wants_grad_cosines(_ctx(m, "student", b, 4))
    cos = m.grad_cosines(b[1], ctx, b[2])
    assert sorted(cos) == [f"student/grad_cos_k{k}" for k in (1, 2, 3, 4)]
    params = list(m.roles["student"].net.parameters())
    x0, _ = m.student_sample(b[1], ctx, b[2], grad=True, k=torch.full((6,), 1))
    g = [torch.cat([p.flatten() for p in torch.autograd.grad(t.mean(), params, retain_graph=True)])
         for t in (m.dmd_term(x0, b[1], ctx, b[2])[0], m.gan_term(x0, b[1], ctx, b[2]))]
    want = float(g[0] @ g[1] / (g[0].norm() * g[1].norm()))
    assert float(cos["student/grad_cos_k2"]) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert abs(want) > 1e-4  # the two terms pull in measurably related or opposed directions
    assert all(-1 <= float(v) <= 1 for v in cos.values())


def test_the_grad_conflict_figure_reads_the_logged_cosines_per_iteration_and_step(tmp_path):
    """projects/dmd2/claims.py on a recorded metrics.csv (no fit): rows at the iterations that logged
    cosines (0-based, the row's progress/iteration less one), their mean per step k, and the run's
    overrides (the probe on, logging every iteration)."""
    from types import SimpleNamespace

    from common.project_index import ROOT, projects
    from projects.dmd2 import claims

    run = tmp_path / "grad_conflict"
    run.mkdir()
    header = "progress/iteration,student/loss,student/grad_cos_k1,student/grad_cos_k2\n"
    (run / "metrics.csv").write_text(header + "25,0.1,,\n26,0.2,0.5,-0.25\n27,0.1,,\n76,0.3,-0.1,0.75\n")
    calls = []
    h = SimpleNamespace(fit=lambda name, cfg, ov: calls.append((name, cfg, ov)), out=tmp_path, root=ROOT,
                        fmt=lambda v, nd=2: "-" if v is None else f"{v:.{nd}f}")
    res, checks = claims.grad_conflict(projects("method")["dmd2"], {"every": 25}, h)
    assert [r["iteration"] for r in res["rows"]] == [25, 75] and res["rows"][1]["cos"] == {1: -0.1, 2: 0.75}
    assert res["mean"] == {1: pytest.approx(0.2), 2: pytest.approx(0.25)} and checks == []
    assert calls == [("grad_conflict", "projects/dmd2/config.yaml",
                      ["module.grad_cos_every=25", "trainer.log_every_n_steps=1"])]
    assert "| 75 | -0.100 | 0.750 |" in res["table"]
    (run / "metrics.csv").write_text(header + "25,0.1,,\n")
    with pytest.raises(SystemExit, match="no gradient cosine"):
        claims.grad_conflict(projects("method")["dmd2"], {"every": 25}, h)
