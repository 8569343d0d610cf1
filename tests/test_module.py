"""The role and schedule API of common/module.py on toy networks: it can express every method's
update pattern, passes data between roles through the step context, guards non-finite steps,
checkpoints each tensor once and only what it must, and loads strictly."""
import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from common.config import ConfigError
from common.critics.lora import adapters_disabled, add_lora, lora_parameters
from common.data.datamodule import PositionDataset, StreamBatchSampler
from common.module import DistillationModule, NonFiniteError
from common.roles import Role, RoleStep, Schedule, role_configs
from common.runner import max_steps


class Tiny(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.qkv = nn.Linear(2, 8)
        self.proj = nn.Linear(8, 2)

    def forward(self, x):
        return self.proj(torch.tanh(self.qkv(x)))


def phases(*cycles_until):
    """``phases((2, [["critic"]]), (None, [["student"]]))`` -> a schedule spec."""
    return [{"name": f"p{i}", "until": u, "cycle": c} for i, (u, c) in enumerate(cycles_until)]


class Recorder(DistillationModule):
    """Each role's loss records (iteration, phase, role, first position of its batch slice); the
    student hands its output to later roles through the context, the critic records what it read."""

    def __init__(self, kinds: dict, schedule=None, nan_at: dict | None = None, split_batches=False,
                 roles: dict | None = None, reference=False):
        roles = roles if roles is not None else {n: {"lr": 1e-2, "grad_clip": 1.0} for n in kinds}
        super().__init__(roles=roles, schedule=schedule, seed=0, ema_beta=0.9)
        self.calls, self.read = [], []
        self.nan_at = nan_at or {}
        self.split = split_batches
        teacher = Tiny(0)
        self.add_role("teacher", teacher, "embedded", trainable=False, source={"path": "t", "sha256": "ab"})
        for name, kind in kinds.items():
            if kind == "lora":  # shares the teacher's frozen base, trains its own adapters
                self.add_role(name, add_lora(teacher, rank=2, alpha=2, targets=["qkv"]), "lora",
                              params=lora_parameters)
            else:
                self.add_role(name, Tiny(1), "teacher")
        if reference:  # a frozen copy the run makes itself (no file behind it)
            self.add_role("reference", copy.deepcopy(self.roles["student"].net), "student", trainable=False)

    def _loss(self, name, batch, ctx):
        x, _, pos = batch
        if self.split:  # separate halves of the batch per role (Uni-Instruct)
            half = len(x) // 2
            x, pos = (x[:half], pos[:half]) if name != "student" else (x[half:], pos[half:])
        self.calls.append((ctx.iteration, ctx.phase, name, int(pos[0])))
        out = self.roles[name].net(x)
        with torch.no_grad(), adapters_disabled(self.roles["teacher"].net):
            target = self.roles["teacher"].net(x)
        loss = (out - target - 1).pow(2).mean()
        if ctx.iteration in self.nan_at.get(name, ()):
            loss = loss * float("nan")
        return loss, out

    def loss_student(self, batch, ctx):
        loss, out = self._loss("student", batch, ctx)
        return RoleStep(loss, {}, {"out": out.detach(), "iteration": torch.tensor(ctx.iteration)})

    def loss_critic(self, batch, ctx):
        loss, _ = self._loss("critic", batch, ctx)
        made = ctx.output("student", "iteration", lambda: torch.tensor(-1 - ctx.iteration))
        self.read.append((ctx.iteration, int(made)))
        return RoleStep(loss)

    def loss_discriminator(self, batch, ctx):
        return RoleStep(self._loss("discriminator", batch, ctx)[0])


class Stream(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.ds = PositionDataset(torch.randn(64, 2), torch.zeros(64, dtype=torch.long), seed=0)

    def train_dataloader(self):
        start = getattr(self.trainer.lightning_module, "batches_seen", 0)
        return DataLoader(self.ds, batch_sampler=StreamBatchSampler(8, start_batch=start))


def fit(module, iterations, tmp_path=None, ckpt=None):
    from common.runner import RunLength

    cfg = {"run": {"iterations": iterations}, "data": {"batch_size": 8}}
    trainer = L.Trainer(max_steps=max_steps(cfg, module), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        use_distributed_sampler=False, default_root_dir=tmp_path, callbacks=[RunLength(cfg)])
    trainer.fit(module, datamodule=Stream(), ckpt_path=ckpt)
    return trainer


def test_swiftbrush_pattern_student_then_critic_same_batch_through_the_context():
    m = Recorder({"student": "full", "critic": "lora"}, schedule=phases((None, [["student", "critic"]])))
    fit(m, 3)
    assert [(i, r, p) for i, _, r, p in m.calls] == [(i, r, 8 * i) for i in range(3) for r in ("student", "critic")]
    assert m.read == [(0, 0), (1, 1), (2, 2)]  # the critic read this iteration's student output
    assert m.ema is not None and m.ema.step.item() == 3  # EMA updated only after student steps
    assert not hasattr(m, "_x0") and "out" not in vars(m)  # nothing stashed on the module


def test_uni_instruct_pattern_named_phases_critic_first_on_separate_batches():
    spec = [{"name": "warmup", "until": 2, "cycle": [["critic", "discriminator"]]},
            {"name": "main", "cycle": [["critic", "discriminator", "student"]]}]
    m = Recorder({"student": "full", "critic": "full", "discriminator": "full"}, schedule=spec, split_batches=True)
    fit(m, 4)
    assert [(i, ph, r) for i, ph, r, _ in m.calls] == [
        (0, "warmup", "critic"), (0, "warmup", "discriminator"), (1, "warmup", "critic"),
        (1, "warmup", "discriminator"), (2, "main", "critic"), (2, "main", "discriminator"), (2, "main", "student"),
        (3, "main", "critic"), (3, "main", "discriminator"), (3, "main", "student")]
    crit = {i: p for i, _, r, p in m.calls if r == "critic"}
    stud = {i: p for i, _, r, p in m.calls if r == "student"}
    assert all(stud[i] == crit[i] + 4 for i in stud)  # separate halves of the global batch
    # the critic steps before the student: it never sees a student output, not even a stale one
    assert m.read == [(i, -1 - i) for i in range(4)]


def test_rcm_five_to_one_cycle_critic_makes_its_own_samples_never_stale_ones():
    """rCM's 5:1 cycle: critic steps in iterations without a student step must not read the output a
    student step left in an earlier iteration; they make their own (here: the marker -1 - iteration)."""
    spec = phases((3, [["student"]]), (None, [["critic"]] * 4 + [["student", "critic"]]))
    m = Recorder({"student": "full", "critic": "full"}, schedule=spec)
    fit(m, 13)
    assert [r for _, _, r, _ in m.calls] == ["student"] * 3 + (["critic"] * 4 + ["student", "critic"]) * 2
    assert m.read == [(i, -1 - i) for i in (3, 4, 5, 6)] + [(7, 7)] + [(i, -1 - i) for i in (8, 9, 10, 11)] + \
        [(12, 12)]
    assert m.ema.step.item() == 5


def test_twinflow_pattern_single_network():
    m = Recorder({"student": "full"})
    fit(m, 4)
    assert [r for _, _, r, _ in m.calls] == ["student"] * 4
    assert set(m.trainable_roles()) == {"student"} and m.schedule.phases[0].name == "main"


class Draws(Recorder):
    """The critic records the keyed draw it makes and the repeat it was told."""

    def loss_critic(self, batch, ctx):
        self.read.append((ctx.iteration, ctx.repeat, float(ctx.randn(0, (), batch[-1][:1]))))
        return RoleStep(self._loss("critic", batch, ctx)[0])


def test_a_group_can_step_a_role_several_times_each_with_fresh_draws():
    m = Draws({"student": "full", "critic": "full"}, schedule=phases((None, [["critic", "critic", "student"]])))
    before = copy.deepcopy(m.roles["critic"].net.state_dict())
    assert max_steps({"run": {"iterations": 3}}, m) == 9
    trainer = fit(m, 3)
    assert trainer.global_step == 9 and m.iteration == 3
    assert [(i, r) for i, _, r, _ in m.calls] == [(i, r) for i in range(3) for r in ("critic", "critic", "student")]
    assert [(i, k) for i, k, _ in m.read] == [(i, k) for i in range(3) for k in (0, 1)]
    draws = [d for _, _, d in m.read]
    assert len(set(draws)) == 6  # a repeat draws afresh, not the first step's numbers again
    # repeat 0 draws what a single step would: runs without repeats are unchanged
    single = Draws({"student": "full", "critic": "full"}, schedule=phases((None, [["critic", "student"]])))
    fit(single, 3)
    assert [d for _, _, d in single.read] == draws[::2]
    # both steps moved the critic: its optimizer stepped twice an iteration (Adam's first step moves
    # each weight by about lr, so six steps move one at least four lr's further than three)
    moved = max((a - before[k]).abs().max() for k, a in m.roles["critic"].net.state_dict().items())
    moved1 = max((a - before[k]).abs().max() for k, a in single.roles["critic"].net.state_dict().items())
    assert moved > moved1


def test_max_steps_is_derived_from_iterations_and_the_schedule():
    uni = Schedule.from_config(phases((80, [["critic"]]), (None, [["critic", "student"]])))
    assert uni.steps_for(400) == 80 + 2 * 320 and uni.steps_for(400, start=100) == 2 * 300
    rcm = Schedule.from_config(phases((None, [["critic"]] * 5 + [["student"]])))
    assert rcm.steps_for(12) == 12
    # the per-phase count equals walking the iterations, for every start and end
    mixed = Schedule.from_config(phases((3, [["student"]]), (7, [["critic", "student"], ["critic"]]),
                                        (None, [["critic"]] * 4 + [["student", "critic"]])))
    for sch in (uni, rcm, mixed):
        for start in range(0, 14):
            for end in range(start, 30):
                walked = {}
                for it in range(start, end):
                    for r in sch.roles_at(it):
                        walked[r] = walked.get(r, 0) + 1
                assert {r: n for r, n in sch.steps_per_role(end, start).items() if n} == walked, (start, end)
    m = Recorder({"student": "full", "critic": "full"}, schedule=phases((2, [["critic"]]), (None, [["critic", "student"]])))
    assert max_steps({"run": {"iterations": 5}}, m) == 2 + 2 * 3
    trainer = fit(m, 5)
    assert m.iteration == 5 and trainer.global_step == 8


def test_roles_config_sets_each_roles_optimizer_and_rejects_what_it_does_not_know():
    roles = {"student": {"lr": 3e-3, "betas": [0.0, 0.99], "weight_decay": 0.1, "grad_clip": 0.5, "warmup": 4},
             "critic": {"lr": 7e-3, "eps": 1e-6}}
    m = Recorder({"student": "full", "critic": "full"}, roles=roles)
    opts, scheds = m.configure_optimizers()
    s = opts[m._opt_index["student"]].param_groups[0]
    c = opts[m._opt_index["critic"]].param_groups[0]
    assert (s["lr"], s["betas"], s["weight_decay"]) == (3e-3 * 0.25, (0.0, 0.99), 0.1)  # warm-up step 1 of 4
    assert (c["lr"], c["eps"]) == (7e-3, 1e-6)
    assert m.roles["student"].config.grad_clip == 0.5 and m.roles["critic"].config.grad_clip is None
    with pytest.raises(ConfigError, match="unknown role 'roles.generator'"):
        role_configs({"generator": {"lr": 1.0}})
    with pytest.raises(ConfigError, match="unknown config key 'roles.critic.learning_rate'"):
        role_configs({"critic": {"learning_rate": 1.0}})
    with pytest.raises(ConfigError, match="'roles.critic.lr' has type str"):
        role_configs({"critic": {"lr": "fast"}})
    with pytest.raises(ConfigError, match="roles.critic.init' must be one of"):
        role_configs({"critic": {"init": "random"}})
    with pytest.raises(ConfigError, match="unknown config key 'roles.critic.lora.ranks'"):
        role_configs({"critic": {"init": "lora", "lora": {"ranks": 4}}})
    m = Recorder({"student": "full"}, roles={"student": {}, "discriminator": {"lr": 1e-3}})
    with pytest.raises(ConfigError, match=r"roles section names \['discriminator'\], which Recorder does not train"):
        m.check_roles()


class Grouped(Recorder):
    """The critic's optimizer keeps its ``proj`` layer at its own learning rate and betas."""

    overrides = {"lr": 5e-2, "betas": (0.5, 0.9)}

    def param_groups(self, name, params):
        if name != "critic":
            return super().param_groups(name, params)
        proj = {id(p) for p in self.roles["critic"].net.proj.parameters()}
        return [([p for p in params if id(p) not in proj], {}), ([p for p in params if id(p) in proj], self.overrides)]


def test_a_method_can_give_part_of_a_role_its_own_optimizer_settings(tmp_path):
    """``param_groups``: the overridden group keeps its own lr / betas through the warm-up, through
    training and through ``on_train_start``'s re-application of the roles config on a resume; every
    parameter must be in one group, and only optimizer settings can be overridden."""
    roles = {"student": {"lr": 1e-2}, "critic": {"lr": 1e-2, "betas": [0.9, 0.999], "warmup": 2}}
    m = Grouped({"student": "full", "critic": "full"}, roles=roles)
    trainer = fit(m, 3, tmp_path)
    base, own = m._optimizer("critic").param_groups
    assert (base["lr"], base["betas"], own["lr"], own["betas"]) == (1e-2, (0.9, 0.999), 5e-2, (0.5, 0.9))
    assert {id(p) for p in own["params"]} == {id(p) for p in m.roles["critic"].net.proj.parameters()}
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    m2 = Grouped({"student": "full", "critic": "full"}, roles=roles)
    fit(m2, 4, tmp_path, ckpt=str(tmp_path / "c.ckpt"))
    assert [g["lr"] for g in m2._optimizer("critic").param_groups] == [1e-2, 5e-2]

    m3 = Grouped({"student": "full", "critic": "full"}, roles=roles)
    m3.overrides = {"momentum": 0.9}
    with pytest.raises(ValueError, match=r"overrides unknown optimizer settings \['momentum'\]"):
        m3.configure_optimizers()
    m3.param_groups = lambda name, params: [(params[:1], {})]
    with pytest.raises(ValueError, match="must place each of the role's parameters in one group"):
        m3.configure_optimizers()


def test_schedule_validation():
    with pytest.raises(ValueError, match="increasing 'until'"):
        Schedule.from_config(phases((5, [["a"]]), (3, [["b"]]), (None, [["c"]])))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['every'\] in schedule\[0\]"):
        Schedule.from_config([{"name": "main", "every": 2, "cycle": [["student"]]}])
    with pytest.raises(ConfigError, match="cycle must be a non-empty list of lists"):
        Schedule.from_config([{"cycle": ["student"]}])
    with pytest.raises(ConfigError, match="phase names repeat"):
        Schedule.from_config([{"name": "a", "until": 2, "cycle": [["s"]]}, {"name": "a", "cycle": [["s"]]}])
    m = Recorder({"student": "full"}, schedule=phases((None, [["critic"]])))
    with pytest.raises(ConfigError, match=r"not trainable here: \['critic'\]"):
        m.check_roles()
    m = Recorder({"student": "full", "critic": "full"}, schedule=phases((None, [["student"]])))
    with pytest.raises(ConfigError, match=r"the schedule never steps trainable role\(s\) \['critic'\]"):
        m.check_roles()
    with pytest.raises(ValueError, match="unknown role 'generator'"):
        Role("generator", Tiny(), True, "scratch")


def test_lora_critic_shares_frozen_teacher_weights():
    m = Recorder({"student": "full", "critic": "lora"}, schedule=phases((None, [["student", "critic"]])))
    base_before = copy.deepcopy({k: v for k, v in m.roles["teacher"].net.state_dict().items() if "lora_" not in k})
    lora_before = [p.clone() for p in lora_parameters(m.roles["critic"].net)]
    trainer = fit(m, 3)
    base_after = {k: v for k, v in m.roles["teacher"].net.state_dict().items() if "lora_" not in k}
    for k in base_before:
        torch.testing.assert_close(base_after[k], base_before[k], rtol=0, atol=0)
    assert any((a - b).abs().max() > 0 for a, b in zip(lora_parameters(m.roles["critic"].net), lora_before))
    opt = trainer.optimizers[m._opt_index["critic"]]  # the critic's optimizer holds the adapters only
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in lora_parameters(m.roles["critic"].net)}


def _tensor_keys(module):
    by_id = {}
    for k, t in module.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(k)
    return by_id


def test_each_tensor_appears_under_one_key():
    for kinds in ({"student": "full", "critic": "lora"}, {"student": "full", "critic": "full"}):
        m = Recorder(kinds, reference=True)
        twice = {tuple(v) for v in _tensor_keys(m).values() if len(v) > 1}
        assert not twice, sorted(twice)[:3]
    from projects.swiftbrush.method import SwiftBrush

    for init in ("copy", "lora"):
        sb = SwiftBrush(roles={"critic": {"init": init}})
        twice = {tuple(v) for v in _tensor_keys(sb).values() if len(v) > 1}
        assert not twice, sorted(twice)[:3]
        assert all(k.split(".")[0] in ("nets", "ema") for k in sb.state_dict())


def test_checkpoint_holds_trainable_and_produced_roles_and_identifies_file_roles(tmp_path):
    m = Recorder({"student": "full", "critic": "lora"}, schedule=phases((None, [["student", "critic"]])), reference=True)
    trainer = fit(m, 2, tmp_path)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    ck = torch.load(path, weights_only=True)
    keys = set(ck["state_dict"])
    assert any(k.startswith("nets.student.") for k in keys) and any(k.startswith("ema.") for k in keys)
    assert any("lora_" in k for k in keys)
    assert not any(k.startswith("nets.teacher.") and "lora_" not in k for k in keys)  # frozen base: identified
    assert {k for k in keys if k.startswith("nets.reference.")} == {f"nets.reference.{k}" for k in
                                                                    m.roles["reference"].net.state_dict()}
    assert ck["distill"]["frozen"] == {"teacher": {"path": "t", "sha256": "ab"}}
    assert ck["distill"]["iteration"] == 2 and len(ck["optimizer_states"]) == 2
    other = Recorder({"student": "full", "critic": "lora"}, reference=True)
    other.roles["teacher"].source = {"path": "u", "sha256": "cd"}
    with pytest.raises(ValueError, match="trained with another teacher"):
        other.on_load_checkpoint(ck)


def test_loading_is_strict_apart_from_roles_identified_by_file(tmp_path):
    m = Recorder({"student": "full", "critic": "full"}, reference=True)
    fit(m, 2, tmp_path)
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("nets.teacher.")}
    fresh = Recorder({"student": "full", "critic": "full"}, reference=True)
    fresh.load_state_dict(state)  # the teacher is absent: identified by hash, not stored
    for k, v in fresh.state_dict().items():
        if k.startswith("nets.student."):
            torch.testing.assert_close(v, m.state_dict()[k], rtol=0, atol=0)
    missing = {k: v for k, v in state.items() if not k.startswith("nets.reference.")}
    with pytest.raises(RuntimeError, match=r"missing \d+ key\(s\): nets.reference"):
        Recorder({"student": "full", "critic": "full"}, reference=True).load_state_dict(missing)
    with pytest.raises(RuntimeError, match="unexpected 1 key"):
        Recorder({"student": "full", "critic": "full"}, reference=True).load_state_dict({**state, "nets.extra.w": torch.zeros(1)})


def test_nonfinite_steps_are_skipped_and_counted_then_stop_the_run():
    m = Recorder({"student": "full"}, nan_at={"student": {1, 2}})
    trainer = fit(m, 5)
    assert m.nonfinite["skipped"] == 2 and m.iteration == 5 and trainer.global_step == 3
    m = Recorder({"student": "full"}, nan_at={"student": set(range(100))})
    m.max_nonfinite = 3
    with pytest.raises(NonFiniteError, match="4 steps in a row had a non-finite loss"):
        fit(m, 10)


def test_a_loss_must_return_a_role_step():
    class Old(Recorder):
        def loss_student(self, batch, ctx):
            return super().loss_student(batch, ctx).loss, {}

    with pytest.raises(TypeError, match="must return a RoleStep"):
        fit(Old({"student": "full"}), 1)


def test_keyed_draws_depend_on_role_purpose_and_position_not_on_the_batch():
    m = Recorder({"student": "full", "critic": "full"})
    pos = torch.arange(6)
    a = m.step_context("student", pos).randn(3, (2,))
    b = torch.cat([m.step_context("student", pos[:2]).randn(3, (2,)), m.step_context("student", pos[2:]).randn(3, (2,))])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - m.step_context("critic", pos).randn(3, (2,))).abs().min() > 0  # another role, another stream
    assert (a - m.step_context("student", pos).randn(4, (2,))).abs().min() > 0  # another purpose
    m.iteration = 1
    assert (a - m.step_context("student", pos).randn(3, (2,))).abs().min() > 0  # another iteration
