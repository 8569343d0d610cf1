"""rCM (projects/rcm) on a tiny random teacher: when the DMD regulariser joins, the backward
simulation, and the critic's loss."""
import dataclasses
import math

import pytest
import torch

from common.config import ConfigError
from projects.rcm.method import RCM

SCHEDULE = [{"name": "warmup", "until": 2, "cycle": [["student"]]},
            {"name": "main", "cycle": [["critic"], ["critic"], ["student"]]}]


def _module(tiny_teacher, **kw):
    torch.manual_seed(0)
    return RCM(teacher=tiny_teacher, **{"tangent_warmup": 2, "schedule": SCHEDULE, **kw})


def _batch(m, n=4):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, *m.sample_shape, generator=g) * 2 - 1, torch.arange(n) % 10, torch.arange(n)


def _ctx(m, role, batch, it):
    return dataclasses.replace(m.step_context(role, batch[2]), iteration=it, phase=m.schedule.phase_at(it).name)


def test_the_dmd_term_joins_after_the_tangent_warm_up(tiny_teacher):
    m = _module(tiny_teacher)
    b = _batch(m)
    early, late = m.loss_student(b, _ctx(m, "student", b, 1)), m.loss_student(b, _ctx(m, "student", b, 4))
    assert "student/dmd" not in early.logs and early.logs["student/tangent_r"] == 0.5
    assert late.logs["student/tangent_r"] == 1.0 and torch.isfinite(late.logs["student/dmd"])
    torch.testing.assert_close(late.loss, late.logs["student/scm"] + 0.01 * late.logs["student/dmd"])
    m.roles["student"].net.zero_grad()
    late.loss.backward()
    assert all(p.grad is not None for p in m.roles["student"].net.parameters() if p.requires_grad)
    assert all(p.grad is None for p in m.roles["teacher"].net.parameters())


def test_the_backward_simulation_counts_each_roles_steps_and_walks_toward_the_data(tiny_teacher):
    m = _module(tiny_teacher)
    b = _batch(m)
    # iterations 0, 1: student (warm-up); then critic, critic, student, ...
    assert [m._steps_done("student", it) for it in (0, 2, 5, 6, 8)] == [0, 2, 3, 3, 4]
    assert [m._steps_done("critic", it) for it in (2, 3, 4, 5, 7)] == [0, 1, 2, 2, 4]
    x, t = m._backsim(b[1], b[2], _ctx(m, "student", b, 5), 0)
    torch.testing.assert_close(t, torch.full((4,), math.pi / 2))
    z = _ctx(m, "student", b, 5).randn(1, m.sample_shape, b[2])  # Purpose.LATENT
    torch.testing.assert_close(x, 0.5 * z)  # pure noise sigma_d z
    _, t3 = m._backsim(b[1], b[2], _ctx(m, "student", b, 5), 3)
    assert (t3 < math.pi / 2).all() and (t3 > 0).all()
    _, t_fixed = RCM(teacher=tiny_teacher, tangent_warmup=2, schedule=SCHEDULE, dmd_fixed_times=[1.5, 1.4, 1.0]) \
        ._backsim(b[1], b[2], _ctx(m, "student", b, 5), 2)
    torch.testing.assert_close(t_fixed, torch.full((4,), 1.4))


def test_the_critic_learns_the_students_x0_by_dsm_weighted_one_over_sin_squared(tiny_teacher):
    m = _module(tiny_teacher)
    b = _batch(m)
    ctx = _ctx(m, "critic", b, 2)
    step = m.loss_critic(b, ctx)
    with torch.no_grad():  # no backward simulation at the critic's first step: x0 of pure noise
        x0 = m.generate(ctx.randn(1, m.sample_shape, b[2]), b[1])
        t_D = m._t_D(ctx, b[2], 2)
        x_D = m._noised(x0, t_D, ctx.randn(3, m.sample_shape, b[2]))
        want = ((m.den.fake(x_D, t_D, b[1]) - x0).pow(2).flatten(1).mean(1) / torch.sin(t_D) ** 2).mean()
    torch.testing.assert_close(step.loss.detach(), want)


def test_a_fit_of_a_few_iterations_trains_both_roles_and_samples_in_four_steps(tiny_teacher, tmp_path):
    import fit

    d = tmp_path / "run"
    assert fit.main(["projects/rcm/config.yaml", f"module.teacher={tiny_teacher}", f"run.dir={d}",
                     "run.iterations=5", "schedule.0.until=1", "schedule.1.until=2", "module.tangent_warmup=1",
                     "schedule.2.cycle=[[critic],[student]]", "data.batch_size=4", "validation.steps=[]",
                     "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=2"]) == 0
    import csv

    # a flush to metrics.csv holds the roles that stepped since the last flush, each at its latest value:
    # iterations 0-1 the student alone (the dense phase, the warm-up), 2-3 the critic and the student
    rows = [{k: v for k, v in r.items() if v and k.endswith("/loss")} for r in csv.DictReader(open(d / "metrics.csv"))
            if r.get("step")]
    assert [sorted(r) for r in rows[:2]] == [["student/loss"], ["critic/loss", "student/loss"]]
    assert rows[0]["student/loss"] != rows[1]["student/loss"]
    from common.serialization import read
    from common.sampling import generate

    state = read(d / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 5 and state["distill"]["iteration"] == 5
    m = _module(tiny_teacher, student_time_scale=1.0, tangent_warmup=1,
                schedule=[{"name": "dense", "until": 1, "cycle": [["student"]]}, *SCHEDULE])
    m.load_state_dict(state["state_dict"])
    x = generate(m.generator_denoiser(), (3, *m.sample_shape), [math.pi / 2, 1.3, 1.0, 0.6], cond=torch.arange(3),
                 sampler="multistep", seed=0)
    one = generate(m.generator_denoiser(), (3, *m.sample_shape), 1, cond=torch.arange(3), sampler="multistep", seed=0)
    assert torch.isfinite(x).all() and (x - one).abs().max() > 1e-4


def test_the_warm_up_phase_must_match_the_tangent_warm_up(tiny_teacher):
    with pytest.raises(ConfigError, match="tangent_warmup=5 but the schedule's warmup phase ends at 2"):
        RCM(teacher=tiny_teacher, tangent_warmup=5, schedule=SCHEDULE)


def test_a_dense_student_is_fitted_first_and_the_warm_up_and_dmd_count_from_there(tiny_teacher):
    from common.rng import Purpose

    dense = [{"name": "dense", "until": 3, "cycle": [["student"]]}, {"name": "warmup", "until": 5, "cycle": [["student"]]},
             {"name": "main", "cycle": [["critic"], ["student"]]}]
    m = _module(tiny_teacher, student_time_scale=1.0, schedule=dense)
    with torch.no_grad():  # the same non-trivial weights in both (the tiny teacher's output layers are zero)
        for net in (m.roles["teacher"].net, m.roles["student"].net):
            torch.manual_seed(3)
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    x, y, pos = b = _batch(m)
    seen = []
    hooks = [net.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
             for net in (m.roles["student"].net, m.ema.ema_model)]
    t = torch.tensor([0.3, 0.8, 1.2, 1.5])
    with torch.no_grad():
        m.generator_denoiser()(x, t, y)  # the EMA copy the sampler sees
        m.generate(x, y)  # the live student, at pi/2
    [h.remove() for h in hooks]
    torch.testing.assert_close(seen[0], torch.sin(t) / (torch.sin(t) + torch.cos(t)))  # flow time s, not 1000 s
    torch.testing.assert_close(seen[1], torch.ones(4))
    ctx = _ctx(m, "student", b, 1)
    step = m.loss_student(b, ctx)
    td = m._t_G(ctx, pos)
    x_t = m._noised(m.data_scale * x, td, ctx.randn(Purpose.NOISE, m.sample_shape, pos))
    with torch.no_grad():
        want = (m.den.student.predict(x_t, td, y, kind="trigflow")
                - m.den.conditional.predict(x_t, td, y, kind="trigflow")).pow(2).mean()
    assert ctx.phase == "dense" and "student/scm" not in step.logs and want > 1e-3
    torch.testing.assert_close(step.loss.detach(), want)
    warm, late = m.loss_student(b, _ctx(m, "student", b, 4)), m.loss_student(b, _ctx(m, "student", b, 6))
    assert warm.logs["student/tangent_r"] == 0.5 and "student/dmd" not in warm.logs
    assert late.logs["student/tangent_r"] == 1.0 and "student/dmd" in late.logs
    with pytest.raises(ConfigError, match="ends at 4, not 5: the DMD term and the critic start after the dense phase"):
        _module(tiny_teacher, student_time_scale=1.0, schedule=[dense[0], {**dense[1], "until": 4}, dense[2]])


def test_the_sampler_sees_the_student_in_the_teachers_data_units_whatever_sigma_d(tiny_teacher):
    """TrigFlow's x0 is sigma_d times the teacher's data; the samples come back in the teacher's units,
    so sigma_d 0.5 and 1 give the same samples of the same network (times are sigma_d-free)."""
    from common.sampling import generate

    out = {}
    for sd in (0.5, 1.0):
        m = _module(tiny_teacher, sigma_d=sd)
        with torch.no_grad():  # the same non-trivial student in both
            torch.manual_seed(3)
            for p in m.ema.ema_model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        assert m.data_scale == sd
        out[sd] = generate(m.generator_denoiser(), (3, *m.sample_shape), [math.pi / 2, 1.3, 0.6],
                           cond=torch.arange(3), sampler="multistep", seed=0)
    assert out[1.0].abs().max() > 0.1
    torch.testing.assert_close(out[0.5], out[1.0], rtol=1e-4, atol=1e-4)


def test_the_training_jvp_goes_through_the_f3_attention(tiny_teacher, attention_jvp_calls):
    m = _module(tiny_teacher)
    b = _batch(m)
    m.loss_student(b, _ctx(m, "student", b, 1))  # warm-up: the sCM term alone
    assert len(attention_jvp_calls) == len(m.roles["student"].net.blocks)
