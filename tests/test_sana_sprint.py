"""SANA-Sprint (projects/sana_sprint) on a tiny random teacher: the student starts as the teacher and
reads its guidance input, the losses of its two roles, the route of its JVP, and a short fit."""
import dataclasses
import math

import pytest
import torch

from common.config import ConfigError
from common.rng import Purpose
from projects.sana_sprint.method import SanaSprint
from projects.sana_sprint.student import WithGuidance

BLOCKS = ["block1", "block3"]  # the tiny teacher has four blocks


def _module(tiny_teacher, **kw):
    torch.manual_seed(0)
    kw = {"tangent_warmup": 2, "guidance_values": [1.25, 1.5, 1.75], "guidance_sample": 1.5, "disc_blocks": BLOCKS,
          "schedule": [{"name": "main", "cycle": [["student"], ["discriminator"]]}], **kw}
    return SanaSprint(teacher=tiny_teacher, **kw)


def _batch(m, n=4):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, *m.sample_shape, generator=g) * 2 - 1, torch.arange(n) % 10, torch.arange(n)


def _ctx(m, role, batch, it):
    return dataclasses.replace(m.step_context(role, batch[2]), iteration=it, phase="main")


def _perturb(net, scale=0.05, seed=3):
    with torch.no_grad():
        torch.manual_seed(seed)
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))


def test_the_student_starts_as_the_teacher_and_then_reads_its_guidance_input(tiny_teacher):
    m = _module(tiny_teacher)
    x, y, _ = _batch(m)
    t = torch.tensor([0.3, 0.8, 1.2, 1.5])
    student = m.roles["student"].net
    with torch.no_grad():
        want = m.den.teacher(x, t, y)
        for w in (1.0, 4.5):
            got = m.den.student(x, t, {"c": y, "w": torch.full((4,), w)})
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # zero-initialised guidance embedding
        torch.testing.assert_close(student.logvar(t), torch.zeros(4))
        _perturb(student)  # the tiny teacher's zero-initialised output layers ignore every condition
        a = m.den.student(x, t, {"c": y, "w": torch.full((4,), 1.25)})
        b = m.den.student(x, t, {"c": y, "w": torch.full((4,), 1.75)})
    assert (a - b).abs().max() > 1e-4  # the guidance value is an input
    # the guidance embedding and the logvar head are the student's, in its optimizer (pitfall 10)
    opt = {id(p) for p in m.roles["student"].trainable_params()}
    assert {id(p) for p in [*student.cfg_embed.parameters(), *student.logvar_head.parameters()]} <= opt
    assert {id(p) for p in m.roles["discriminator"].trainable_params()} == \
        {id(p) for p in m.roles["discriminator"].net.parameters()}


def test_the_teachers_guided_velocity_takes_a_scale_per_sample(tiny_teacher):
    from common.teachers.denoiser import Guided

    m = _module(tiny_teacher)
    x, y, _ = _batch(m)
    t = torch.tensor([0.3, 0.8, 1.2, 1.5])
    w = torch.tensor([1.25, 1.5, 1.75, 1.5])
    got = m._teacher_dxdt(x, t, y, w)
    from common.teachers.adapters import ConventionAdapter

    for i in range(4):
        ref = ConventionAdapter(Guided(m.den.flow, float(w[i]), "standard"), m.den.teacher.convention)
        with torch.no_grad():
            want = 0.5 * ref.predict(x[i:i + 1], t[i:i + 1], y[i:i + 1], kind="trigflow")
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-5, atol=1e-5)


def test_the_generator_loss_is_the_weighted_scm_plus_half_the_hinge_term_and_reaches_the_student(tiny_teacher):
    m = _module(tiny_teacher)
    _perturb(m.roles["discriminator"].net)  # heads start at zero: make their logits non-trivial
    b = _batch(m)
    step = m.loss_student(b, _ctx(m, "student", b, 1))
    assert step.logs["student/tangent_r"] == 0.5
    torch.testing.assert_close(step.loss, step.logs["student/scm"] + 0.5 * step.logs["student/adv"])
    m.roles["student"].net.zero_grad()
    step.loss.backward()
    student = m.roles["student"].net
    assert student.logvar_head.bias.grad.abs() > 0 and student.net.out.weight.grad.abs().max() > 0
    assert all(p.grad is None for p in m.roles["teacher"].net.parameters())
    # the adversarial term alone moves the student (its gradient flows through x0_hat, pitfall 7)
    ladd = _module(tiny_teacher, scm_weight=0.0)
    _perturb(ladd.roles["discriminator"].net)
    s2 = ladd.loss_student(b, _ctx(ladd, "student", b, 1))
    assert "student/scm" not in s2.logs
    s2.loss.backward()
    assert ladd.roles["student"].net.net.out.weight.grad.abs().max() > 0


def test_the_scm_term_with_unit_weights_is_the_shared_cores_loss(tiny_teacher):
    """adaptive_weight off and no LADD: the loss is scm.loss of the shared core on the drawn inputs."""
    from common import scm
    from common.rng import Purpose

    m = _module(tiny_teacher, adaptive_weight=False, adv_weight=0.0)
    b = _batch(m)
    ctx = _ctx(m, "student", b, 5)
    step = m.loss_student(b, ctx)
    x0, y, pos = 0.5 * b[0], b[1], b[2]
    t = scm.time_from_sigma(torch.exp(0.2 + 1.6 * ctx.randn(Purpose.TIME, (), pos)), 0.5)
    x_t = m._noised(x0, t, ctx.randn(Purpose.NOISE, m.sample_shape, pos))
    w = m._w(ctx, pos)
    assert set(w.tolist()) <= {1.25, 1.5, 1.75}
    dxdt = m._teacher_dxdt(x_t, t, y, w)
    f = lambda x, tt: m.den.student.predict(x, tt, {"c": y, "w": w}, kind="trigflow")  # noqa: E731
    F_, J = scm.tangent(f, x_t, t, dxdt, "jvp")
    g = scm.normalise(scm.target(F_, dxdt, x_t, t, J, 0.5, 1.0, "paper"), 0.1)
    torch.testing.assert_close(step.loss.detach(), scm.loss(F_, g, "mean").mean())


def test_the_discriminator_counts_misaligned_pairs_as_fake(tiny_teacher):
    m = _module(tiny_teacher)
    _perturb(m.roles["discriminator"].net)
    b = _batch(m)
    ctx = _ctx(m, "discriminator", b, 1)
    step = m.loss_discriminator(b, ctx)
    step.loss.backward()
    assert all(p.grad is not None for p in m.roles["discriminator"].net.parameters())
    assert all(p.grad is None for p in m.roles["student"].net.parameters())
    no_mis = _module(tiny_teacher, misaligned=False)
    no_mis.roles["discriminator"].net.load_state_dict(m.roles["discriminator"].net.state_dict())
    other = no_mis.loss_discriminator(b, ctx)
    assert not torch.allclose(step.loss, other.loss)  # the misaligned pairs enter the fake side
    assert step.loss.item() >= 0  # a hinge loss


def test_the_training_jvp_goes_through_the_f3_attention(tiny_teacher, attention_jvp_calls):
    m = _module(tiny_teacher, adv_weight=0.0)
    b = _batch(m)
    m.loss_student(b, _ctx(m, "student", b, 1))
    assert len(attention_jvp_calls) == len(m.roles["student"].net.net.blocks)


def test_bad_settings_are_refused(tiny_teacher):
    with pytest.raises(ConfigError, match="no warm-up phase"):
        _module(tiny_teacher, schedule=[{"name": "warmup", "until": 2, "cycle": [["student"]]},
                                        {"name": "main", "cycle": [["student"], ["discriminator"]]}])
    with pytest.raises(KeyError, match="block9"):
        m = _module(tiny_teacher, disc_blocks=["block1", "block9"])
        b = _batch(m)
        m.loss_discriminator(b, _ctx(m, "discriminator", b, 1))
    with pytest.raises(ConfigError, match="module.disc_head / disc_pool: unknown discriminator head 'cnn'"):
        _module(tiny_teacher, disc_head="cnn")


def test_the_papers_conv_heads_train_in_a_discriminator_step(tiny_teacher):
    """``disc_head: conv`` (the paper-scale config's): the D step's hinge loss reaches the conv heads'
    spectral-norm weights, and ten optimizer steps lower it on the same batch."""
    m = _module(tiny_teacher, disc_head="conv")
    heads = m.roles["discriminator"].net
    assert all(type(h).__name__ == "ConvHead" for h in heads.heads)
    b = _batch(m, 8)
    opt = torch.optim.Adam(heads.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = m.loss_discriminator(b, _ctx(m, "discriminator", b, 1)).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters())
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


DENSE = [{"name": "dense", "until": 3, "cycle": [["student"]]},
         {"name": "main", "cycle": [["student"], ["discriminator"]]}]


def test_the_dense_phase_fits_the_student_at_its_own_time_scale_to_the_teacher(tiny_teacher):
    m = _module(tiny_teacher, student_time_scale=1.0, schedule=DENSE, tangent_warmup=4)
    for net in (m.roles["teacher"].net, m.roles["student"].net.net):  # the same non-trivial weights in both
        _perturb(net)
    seen = []
    hooks = [net.net.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
             for net in (m.roles["student"].net, m.ema.ema_model)]
    x, y, pos = b = _batch(m)
    t = torch.tensor([0.3, 0.8, 1.2, 1.5])
    with torch.no_grad():
        m.den.student(x, t, {"c": y, "w": torch.ones(4)})
        m.generator_denoiser()(x, t, y)
    s = torch.sin(t) / (torch.sin(t) + torch.cos(t))  # the flow time of TrigFlow's t
    assert m.den.flow.time_scale == 1000.0
    torch.testing.assert_close(seen[0], s)  # the live student reads s itself (dense), the teacher 1000 s
    torch.testing.assert_close(seen[1], s)  # and so does the EMA copy the sampler sees
    [h.remove() for h in hooks]
    ctx = dataclasses.replace(m.step_context("student", pos), iteration=1, phase="dense")
    step = m.loss_student(b, ctx)
    td = m._t_of(ctx, pos, Purpose.TIME, m.hparams.p_mean, m.hparams.p_std)
    x_t = m._noised(0.5 * x, td, ctx.randn(Purpose.NOISE, m.sample_shape, pos))
    with torch.no_grad():
        want = (m.den.student.predict(x_t, td, {"c": y, "w": m._w(ctx, pos)}, kind="trigflow")
                - m.den.teacher.predict(x_t, td, y, kind="trigflow")).pow(2).mean()
    torch.testing.assert_close(step.loss.detach(), want)
    assert want > 1e-3  # the rescaled time input makes the copy differ from the teacher until it is fitted
    main = m.loss_student(b, dataclasses.replace(ctx, iteration=5, phase="main"))
    assert main.logs["student/tangent_r"] == 0.5  # the tangent warm-up counts from the end of the dense phase
    with pytest.raises(ConfigError, match="needs a 'dense' phase"):
        _module(tiny_teacher, student_time_scale=1.0)
    with pytest.raises(ConfigError, match="student_time_scale different"):
        _module(tiny_teacher, schedule=DENSE)


def test_a_fit_updates_the_ema_and_samples_in_one_and_four_steps(tiny_teacher, tmp_path):
    import csv

    import fit
    from common.sampling import generate
    from common.serialization import read

    d = tmp_path / "run"
    assert fit.main(["projects/sana_sprint/config.yaml", f"module.teacher={tiny_teacher}", f"run.dir={d}",
                     "run.iterations=5", "run.ckpt_every=3", "schedule.0.until=1", "module.tangent_warmup=2",
                     "module.adaptive_weight=true", f"module.disc_blocks={BLOCKS}",
                     "data.batch_size=4", "validation.steps=[]", "trainer.enable_progress_bar=false",
                     "trainer.log_every_n_steps=1"]) == 0
    rows = [r for r in csv.DictReader(open(d / "metrics.csv")) if r.get("step")]
    assert [sorted(k for k, v in r.items() if v and k.endswith("/loss")) for r in rows] == \
        [["student/loss"]] + [["student/loss"], ["discriminator/loss"]] * 2  # the dense phase, then G, D, G, D
    assert rows[0]["student/dense_mse"] and not rows[1]["student/dense_mse"] and rows[1]["student/scm"]
    state = read(d / "checkpoints" / "last.ckpt")
    # last.ckpt is the final state (the weights the final figures measure), not the last periodic one
    assert state["distill"]["iteration"] == 5 and sorted(p.name for p in (d / "checkpoints").glob("it*")) == \
        ["it0000003.ckpt", "it0000005.ckpt"]
    m = _module(tiny_teacher, student_time_scale=1.0, schedule=DENSE)
    fresh = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("ema.")}
    m.load_state_dict(state["state_dict"])
    moved = [k for k, v in fresh.items() if not torch.equal(v, m.state_dict()[k])]
    assert any("logvar_head" in k for k in moved) and any("net.out" in k for k in moved)  # the EMA is updated
    x4 = generate(m.generator_denoiser(), (3, *m.sample_shape), [math.pi / 2, 1.0, 0.5, 0.2], cond=torch.arange(3),
                  sampler="multistep", seed=0)
    x1 = generate(m.generator_denoiser(), (3, *m.sample_shape), 1, cond=torch.arange(3), sampler="multistep", seed=0)
    with torch.no_grad():
        z = torch.Generator().manual_seed(0)
        want = m.generate(torch.randn(3, *m.sample_shape, generator=z), torch.arange(3), m.ema.ema_model) / 0.5
    assert torch.isfinite(x4).all() and (x4 - x1).abs().max() > 1e-4
    torch.testing.assert_close(x1, want, rtol=1e-4, atol=1e-4)  # the sampler's 1 step is generate(), in data units
    # evaluate.py --set: the checkpoint sampled at another guidance input (only module.* keys)
    from common.checkpoints import load_generator

    last = str(d / "checkpoints" / "last.ckpt")

    def sampled_w(gen):  # the guidance input the sampler feeds the EMA student
        return [mod.w for mod in gen.denoiser.modules() if isinstance(mod, WithGuidance)]

    assert sampled_w(load_generator(last)) == [1.5]
    assert sampled_w(load_generator(last, overrides=["module.guidance_sample=3.0"])) == [3.0]
    with pytest.raises(ValueError, match="bogus"):
        load_generator(last, overrides=["module.bogus=1"])
    with pytest.raises(ValueError, match="only module"):
        load_generator(last, overrides=["run.seed=1"])
