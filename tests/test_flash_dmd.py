"""Flash-DMD (projects/flash_dmd) on a tiny random teacher: the timestep-aware split and its batch
normalisation, the pixel discriminator on the frozen encoder, the fake samples of the critic and the
heads, the EMA fake score, the reference copy and the two RL terms, and the config's checks."""
import pytest
import torch

from common.config import ConfigError
from projects.flash_dmd.method import FlashDMD
from test_dmd2 import _batch, _ctx, _moved

SCHEDULE = [{"name": "main", "cycle": [["critic", "discriminator"], ["student", "critic", "discriminator"]]}]


def _module(tiny_teacher, **kw):
    torch.manual_seed(0)
    m = FlashDMD(teacher=tiny_teacher, **{"schedule": SCHEDULE, "step_sampling": "per_sample", **kw})
    return m


def _heads_say_something(m):
    for head in m.roles["discriminator"].net.heads:
        torch.nn.init.normal_(head.net[-1].weight, std=0.5)


def test_the_threshold_splits_the_steps_and_each_sample_gets_one_term_over_the_batch(tiny_teacher):
    m = _module(tiny_teacher, gan_weight=0.1)
    assert m.times == pytest.approx([1.0, 749 / 999, 499 / 999, 249 / 999])
    assert (m.dm_steps, m.gan_steps) == ([0, 1], [2, 3])  # SDXL's tau = 500: 999, 749 -> DMD
    for r in ("student", "critic"):
        _moved(m, r)
    _heads_say_something(m)
    b = _batch(m, 8)
    ctx = _ctx(m, "student", b, 1)
    x0 = torch.randn(8, *m.sample_shape)
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    per_sample, logs = m.distill_terms(x0, k, b[1], ctx, b[2])
    hi, lo = k < 2, k >= 2
    # each sample's term is the one its step gets, drawn as it would be alone (keyed by position)
    l_dm, _ = m.dmd_term(x0[hi], b[1][hi], ctx, b[2][hi], tau=m.dmd_time(ctx, b[2])[hi])
    torch.testing.assert_close(per_sample[hi], l_dm)
    torch.testing.assert_close(per_sample[lo], 0.1 * m.gan_term(x0[lo], b[1][lo], ctx, b[2][lo]))
    assert float(logs["student/dmd_fraction"]) == 0.5
    # summed: both terms on every sample (DMD2's)
    m.hparams.loss_split = "summed"
    both, _ = m.distill_terms(x0, k, b[1], ctx, b[2])
    l_dm_all, _ = m.dmd_term(x0, b[1], ctx, b[2])
    torch.testing.assert_close(both, l_dm_all + 0.1 * m.gan_term(x0, b[1], ctx, b[2]))
    # the student turn's loss is the per-sample sum over B: a batch of the high steps alone gets half
    # the weight it would get if the low half were absent (section 7.3)
    m.hparams.loss_split = "timestep_aware"
    step = m.loss_student(b, ctx)
    torch.testing.assert_close(step.loss * 8, m.distill_terms(step.outputs["x0"], step.outputs["k"], b[1], ctx,
                                                              b[2])[0].sum(), rtol=1e-5, atol=1e-7)


def test_split_by_dmd_noise_reads_the_dmd_draw(tiny_teacher):
    m = _module(tiny_teacher, split_by="dmd_noise", gan_weight=0.1)
    _moved(m, "critic")
    _heads_say_something(m)
    b = _batch(m, 16)
    ctx = _ctx(m, "student", b, 2)
    x0 = torch.randn(16, *m.sample_shape)
    tau = m.dmd_time(ctx, b[2])
    hi = tau >= m.split_time
    assert hi.any() and (~hi).any()
    per_sample, _ = m.distill_terms(x0, torch.zeros(16, dtype=torch.long), b[1], ctx, b[2])
    torch.testing.assert_close(per_sample[~hi], 0.1 * m.gan_term(x0[~hi], b[1][~hi], ctx, b[2][~hi]))


def test_the_pixel_discriminator_reads_the_frozen_encoder_which_no_optimizer_holds(tiny_teacher, tmp_path):
    m = _module(tiny_teacher)
    enc = m.roles["encoder"]
    assert not enc.trainable and enc.source["sha256"] and not any(p.requires_grad for p in enc.net.parameters())
    opts, _ = m.configure_optimizers()
    held = {id(p) for o in opts for g in o.param_groups for p in g["params"]}
    assert held.isdisjoint(id(p) for p in enc.net.parameters())
    assert {id(p) for p in m.roles["discriminator"].net.parameters()} <= held
    # the heads read the encoder's stage maps of the clean sample; the generator's gradient reaches x0
    _heads_say_something(m)
    b = _batch(m)
    ctx = _ctx(m, "student", b, 1)
    x0 = torch.randn(6, *m.sample_shape, requires_grad=True)
    logits = m.disc_logits(x0, b[1], ctx, b[2], (0, 1), features_grad=True)
    _, maps = enc.net(x0.detach(), return_features=True)
    want = m.roles["discriminator"].net({f"stage{s}": maps[s] for s in (1, 2, 3)})
    torch.testing.assert_close(logits, want)
    m.gan_term(x0, b[1], ctx, b[2]).mean().backward()
    assert float(x0.grad.abs().sum()) > 0 and all(p.grad is None for p in enc.net.parameters())
    # identified by its file in checkpoints, not stored
    assert not any(k.startswith("nets.encoder") for k in m.state_dict()) or \
        all(k in m._identified_keys() for k in m.state_dict() if k.startswith("nets.encoder"))


def test_the_critic_and_the_heads_train_on_the_steps_they_are_given(tiny_teacher):
    m = _module(tiny_teacher, fake_source="dm_steps")
    b = _batch(m, 8)
    x0 = torch.randn(8, *m.sample_shape)
    k = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    student = {"x0": x0, "k": k}
    c = m.loss_critic(b, _ctx(m, "critic", b, 1, {"student": student}))
    torch.testing.assert_close(c.outputs["x0"], x0[k < 2])
    assert torch.equal(c.outputs["pos"], b[2][k < 2])
    # the heads' fake samples are the low-noise steps': none among the critic's here, so a fresh draw there
    fake, kf, _, _ = m.discriminator_sample(b[1], _ctx(m, "discriminator", b, 1, {"critic": c.outputs}), b[2])
    assert set(kf.tolist()) <= {2, 3} and len(fake) == 8
    m.hparams.fake_source = "all"
    c = m.loss_critic(b, _ctx(m, "critic", b, 1, {"student": student}))
    assert torch.equal(c.outputs["x0"], x0)
    fake, kf, _, pos = m.discriminator_sample(b[1], _ctx(m, "discriminator", b, 1, {"critic": c.outputs}), b[2])
    torch.testing.assert_close(fake, x0[k >= 2])
    assert torch.equal(pos, b[2][k >= 2])


def test_the_ema_fake_score_follows_the_critic_after_its_steps(tiny_teacher):
    m = _module(tiny_teacher, fake_ema=0.9)
    critic, ema = m.roles["critic"].net, m.critic_ema
    before = [p.detach().clone() for p in ema.parameters()]
    _moved(m, "critic")
    m.after_optimizer_step("student")
    assert all(torch.equal(a, p) for a, p in zip(before, ema.parameters()))
    m.after_optimizer_step("critic")
    for a, p, c in zip(before, ema.parameters(), critic.parameters()):
        torch.testing.assert_close(p, 0.9 * a + 0.1 * c)
    assert m.fake_score().net is ema
    assert any(k.startswith("critic_ema.") for k in m.state_dict())  # resumes keep it


def test_the_reference_is_the_student_at_rl_start_and_the_dpo_term_picks_the_reward_extremes(tiny_teacher):
    m = _module(tiny_teacher, rl_mode="step_dpo", rl_start=3, rl_beta=0.01)
    assert not m.roles["reference"].trainable and not m.roles["reference"].source  # stored in checkpoints
    assert any(k.startswith("nets.reference.") for k in m.state_dict())
    b = _batch(m)
    _moved(m, "student")
    m.loss_student(b, _ctx(m, "student", b, 1))
    assert int(m.reference_copied_at) == -1
    ref, student = m.roles["reference"].net, m.roles["student"].net
    assert not all(torch.equal(a, p) for a, p in zip(ref.parameters(), student.parameters()))
    ctx = _ctx(m, "student", b, 3)
    step = m.loss_student(b, ctx)
    assert int(m.reference_copied_at) == 3 and "student/rl_dpo_margin" in step.logs
    assert all(torch.equal(a, p) for a, p in zip(ref.parameters(), student.parameters()))
    # at theta = reference the margin is 0, so the term is log 2 on each kept sample
    loss, logs = m.rl_term(None, b[1], ctx, b[2])
    kept = float(logs["student/rl_kept"])
    assert kept > 0 and float(loss.sum()) == pytest.approx(kept * 6 * 0.6931472, rel=1e-5)
    assert float(logs["student/rl_reward_gap"]) > 0


def test_the_dpo_loss_moves_the_mean_toward_the_preferred_draw():
    from projects.flash_dmd.method import dpo_loss

    g = torch.Generator().manual_seed(0)
    mu_ref = torch.randn(3, 1, 4, 4, generator=g)
    x_w, x_l = (mu_ref + 0.5 * torch.randn(3, 1, 4, 4, generator=g) for _ in range(2))
    var, beta = torch.full((3,), 0.25), 0.1
    mu = mu_ref.clone().requires_grad_(True)
    loss, margin = dpo_loss(mu, mu_ref, x_w, x_l, var, beta)
    torch.testing.assert_close(margin, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, torch.full((3,), 0.6931472))
    loss.sum().backward()
    # d/dmu: -beta sigmoid(0) (x_w - x_l) / var
    torch.testing.assert_close(mu.grad, -beta * 0.5 * (x_w - x_l) / 0.25)
    stepped = (mu - 0.1 * mu.grad).detach()
    closer = ((stepped - x_w) ** 2).flatten(1).sum(1) - ((mu_ref - x_w) ** 2).flatten(1).sum(1)
    assert (closer < 0).all() and (dpo_loss(stepped, mu_ref, x_w, x_l, var, beta)[0] < loss.detach()).all()


def test_reward_backprop_descends_the_reward_and_the_control_drops_distillation(tiny_teacher):
    m = _module(tiny_teacher, rl_mode="reward_backprop", rl_start=0, rl_distill=False, rl_weight=2.0)
    b = _batch(m)
    ctx = _ctx(m, "student", b, 0)
    step = m.loss_student(b, ctx)
    assert "student/dmd" not in step.logs and "student/gan" not in step.logs
    x0 = step.outputs["x0"]
    r = m.reward_score(x0, torch.zeros(6))
    torch.testing.assert_close(step.loss, -2.0 * r.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(float(step.logs["student/rl_reward"]), float(r.mean()), rtol=1e-5, atol=1e-6)
    joint = _module(tiny_teacher, rl_mode="reward_backprop", rl_start=0)
    assert "student/dmd" in joint.loss_student(b, ctx).logs
    assert sorted(joint.sample_metrics(torch.zeros(3, *m.sample_shape), None)) == ["reward"]
    assert _module(tiny_teacher).sample_metrics(torch.zeros(3, *m.sample_shape), None) == {}


@pytest.mark.parametrize("kw, words", [
    ({"split_threshold": 0.1}, "on one side"),
    ({"split_threshold": 1.5}, "module.split_threshold must be a fraction"),
    ({"loss_split": "both"}, "module.loss_split must be one of"),
    ({"gan_space": "sam"}, "module.gan_space must be one of"),
    ({"encoder_stages": [7]}, "module.encoder_stages must name stages among 0..3"),
    ({"encoder": "/no/such/ae.pt"}, "module.encoder: no encoder weights"),
    ({"rl_mode": "step_dpo", "reward": "/no/such/reward.pt"}, "module.reward: no reward weights"),
    ({"rl_mode": "step_dpo", "rl_candidates": 1}, "module.rl_candidates must be at least 2"),
    ({"fake_ema": 1.0}, "module.fake_ema must be 0"),
    ({"gan": False, "roles": {"discriminator": None}}, "module.loss_split=timestep_aware needs module.gan=true"),
])
def test_bad_settings_are_named_errors(tiny_teacher, kw, words):
    with pytest.raises(ConfigError, match="module.") as e:
        _module(tiny_teacher, **kw)
    assert words in str(e.value)


def test_the_shipped_reward_scores_real_digits_above_degraded_ones_and_not_one_class_above_another():
    """The reward is not a proxy of the judge: on held-out digits (clean, s = 0) its per-class means
    differ by far less than real digits differ from degraded copies, and it ranks pairs well."""
    from common.data.embedded import load_tensors
    from projects.flash_dmd.reward import class_blindness, load_reward, pairwise_accuracy

    net, source = load_reward()
    assert source["sha256"] and not any(p.requires_grad for p in net.parameters())
    x, y = load_tensors("mnist", "heldout")
    blind = class_blindness(net, x, y)
    assert blind["quality_gap"] > 5 and blind["class_spread"] < 0.1 * blind["quality_gap"], blind
    assert pairwise_accuracy(net, x) >= 0.9


def test_the_efficiency_claim_reads_the_first_validation_at_the_baselines_final_fd(tmp_path):
    """projects/flash_dmd/claims.py on recorded curves (no fits): the iteration ratio, the pro-rata wall
    clock, and a miss when Flash-DMD never gets there."""
    from types import SimpleNamespace

    from common.project_index import ROOT, projects
    from projects.flash_dmd import claims

    curves = {"efficiency_baseline": [{"iteration": 25 * i, "fd": 100.0 - 3 * i} for i in range(1, 21)],
              "efficiency_flash": [{"iteration": 25 * i, "fd": 90.0 - 6 * i} for i in range(1, 21)]}
    calls = []

    def fit(name, config, overrides, resume_from=None):
        calls.append((name, config, overrides))
        return [{"fit_seconds": 500.0 if "baseline" in name else 400.0}]

    def check(name, value, op, bound):
        return {"check": name, "value": value, "ok": value <= bound if op == "<=" else value >= bound}

    h = SimpleNamespace(fit=fit, curve=lambda d, steps: curves[d.name], check=check, fmt=lambda v, nd=2: str(v),
                        out=tmp_path, root=ROOT)
    project = projects("method")["flash_dmd"]
    res, checks = claims.efficiency(project, {"baseline": "dmd2"}, h)
    # DMD2's final FD 40; Flash-DMD first at or under it at 25 * 9 = 225 of DMD2's 500 iterations
    assert res["target_fd"] == 40.0 and res["hit_iteration"] == 225
    assert res["iteration_ratio"] == pytest.approx(225 / 500) and checks[0]["ok"]
    from common.config import load_config

    n_flash = load_config(str(project.config))["run"]["iterations"]
    assert res["wall_ratio"] == pytest.approx(400 * 225 / n_flash / 500)  # Flash-DMD's fit, pro rata
    assert [c[1] for c in calls] == ["projects/dmd2/config.yaml", "projects/flash_dmd/config.yaml"]
    assert all("trainer.val_check_interval=25" in c[2] for c in calls)
    curves["efficiency_flash"] = [{"iteration": 25 * i, "fd": 60.0} for i in range(1, 21)]
    res, checks = claims.efficiency(project, {"baseline": "dmd2"}, h)
    assert res["hit_iteration"] is None and not checks[0]["ok"]
