"""The role and schedule API of common/module.py on toy networks: it can express every method's
update pattern, guards non-finite steps, and checkpoints only what trains."""
import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from common.critics.lora import adapters_disabled, add_lora, lora_parameters
from common.data.datamodule import PositionDataset, StreamBatchSampler
from common.module import DistillationModule, NonFiniteError, Role, Schedule


class Tiny(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.qkv = nn.Linear(2, 8)
        self.proj = nn.Linear(8, 2)

    def forward(self, x):
        return self.proj(torch.tanh(self.qkv(x)))


class Recorder(DistillationModule):
    """Each role's loss records (iteration, role, first position of its batch slice)."""

    def __init__(self, roles: dict, schedule=None, nan_at: dict | None = None, split_batches=False):
        super().__init__(seed=0, schedule=schedule, ema_beta=0.9, val_steps=[])
        self.calls = []
        self.nan_at = nan_at or {}
        self.split = split_batches
        teacher = Tiny(0)
        self.add_role(Role("teacher", teacher, trainable=False, init="embedded", source={"path": "t", "sha256": "ab"}))
        for name, kind in roles.items():
            if kind == "lora":  # shares the teacher's frozen base, trains its own adapters
                net = add_lora(teacher, rank=2, alpha=2, targets=["qkv"])
                self.add_role(Role(name, net, True, "lora-on-teacher", lr=1e-2, params=lora_parameters))
            else:
                self.add_role(Role(name, Tiny(1), True, "teacher", lr=1e-2, grad_clip=1.0))

    def _loss(self, name, batch, ctx):
        x, _, pos = batch
        if self.split:  # separate halves of the batch per role (Uni-Instruct)
            half = len(x) // 2
            x, pos = (x[:half], pos[:half]) if name != "student" else (x[half:], pos[half:])
        self.calls.append((ctx.iteration, name, int(pos[0])))
        out = self.roles[name].net(x)
        with torch.no_grad(), adapters_disabled(self.roles["teacher"].net):
            target = self.roles["teacher"].net(x)
        loss = (out - target - 1).pow(2).mean()
        if ctx.iteration in self.nan_at.get(name, ()):
            loss = loss * float("nan")
        return loss, {}

    def loss_student(self, batch, ctx):
        return self._loss("student", batch, ctx)

    def loss_critic(self, batch, ctx):
        return self._loss("critic", batch, ctx)

    def loss_discriminator(self, batch, ctx):
        return self._loss("discriminator", batch, ctx)


class Stream(L.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.ds = PositionDataset(torch.randn(64, 2), torch.zeros(64, dtype=torch.long), seed=0)

    def train_dataloader(self):
        start = getattr(self.trainer.lightning_module, "batches_seen", 0)
        return DataLoader(self.ds, batch_sampler=StreamBatchSampler(8, start_batch=start))


def fit(module, optimizer_steps, tmp_path=None, ckpt=None):
    trainer = L.Trainer(max_steps=optimizer_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", use_distributed_sampler=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=Stream(), ckpt_path=ckpt)
    return trainer


def test_swiftbrush_pattern_student_then_critic_same_batch():
    m = Recorder({"student": "full", "critic": "lora"}, schedule=[{"until": None, "cycle": [["student", "critic"]]}])
    fit(m, 6)  # 2 optimizer steps per iteration
    assert m.calls == [(i, r, 8 * i) for i in range(3) for r in ("student", "critic")]
    assert m.ema is not None and m.ema.step.item() == 3  # EMA updated only after student steps


def test_uni_instruct_pattern_critic_warmup_then_critic_first_on_separate_batches():
    spec = [{"until": 2, "cycle": [["critic", "discriminator"]]},
            {"until": None, "cycle": [["critic", "discriminator", "student"]]}]
    m = Recorder({"student": "full", "critic": "full", "discriminator": "full"}, schedule=spec, split_batches=True)
    fit(m, 4 + 3 * 2)
    roles = [(i, r) for i, r, _ in m.calls]
    assert roles == [(0, "critic"), (0, "discriminator"), (1, "critic"), (1, "discriminator"),
                     (2, "critic"), (2, "discriminator"), (2, "student"), (3, "critic"), (3, "discriminator"),
                     (3, "student")]
    crit = {i: p for i, r, p in m.calls if r == "critic"}
    stud = {i: p for i, r, p in m.calls if r == "student"}
    assert all(stud[i] == crit[i] + 4 for i in stud)  # separate halves of the global batch


def test_rcm_pattern_tangent_warmup_then_one_student_step_per_five_iterations():
    spec = [{"until": 3, "cycle": [["student"]]},
            {"until": None, "cycle": [["critic"], ["critic"], ["critic"], ["critic"], ["student"]]}]
    m = Recorder({"student": "full", "critic": "full"}, schedule=spec)
    fit(m, 13)
    assert [r for _, r, _ in m.calls] == ["student"] * 3 + (["critic"] * 4 + ["student"]) * 2
    assert m.ema.step.item() == 5


def test_twinflow_pattern_single_network():
    m = Recorder({"student": "full"})
    fit(m, 4)
    assert [r for _, r, _ in m.calls] == ["student"] * 4
    assert set(m.trainable_roles()) == {"student"}


def test_lora_critic_shares_frozen_teacher_weights():
    m = Recorder({"student": "full", "critic": "lora"}, schedule=[{"until": None, "cycle": [["student", "critic"]]}])
    base_before = copy.deepcopy({k: v for k, v in m.roles["teacher"].net.state_dict().items() if "lora_" not in k})
    lora_before = [p.clone() for p in lora_parameters(m.roles["critic"].net)]
    trainer = fit(m, 6)
    base_after = {k: v for k, v in m.roles["teacher"].net.state_dict().items() if "lora_" not in k}
    for k in base_before:
        torch.testing.assert_close(base_after[k], base_before[k], rtol=0, atol=0)
    assert any((a - b).abs().max() > 0 for a, b in zip(lora_parameters(m.roles["critic"].net), lora_before))
    # the critic's optimizer holds the adapters only
    opt = trainer.optimizers[m._opt_index["critic"]]
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert ids == {id(p) for p in lora_parameters(m.roles["critic"].net)}


def test_checkpoint_holds_trainable_roles_and_identifies_frozen_ones(tmp_path):
    m = Recorder({"student": "full", "critic": "lora"}, schedule=[{"until": None, "cycle": [["student", "critic"]]}])
    trainer = fit(m, 4, tmp_path)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    ck = torch.load(path, weights_only=False)
    keys = set(ck["state_dict"])
    assert any(k.startswith("nets.student.") for k in keys) and any(k.startswith("ema.") for k in keys)
    assert any("lora_" in k for k in keys)
    assert not any(k.startswith("nets.teacher.") and "lora_" not in k for k in keys)  # frozen base not stored
    assert not any(k.startswith("nets.critic.") and "lora_" not in k for k in keys)  # the shared base
    assert ck["distill"]["frozen"] == {"teacher": {"path": "t", "sha256": "ab"}}
    assert ck["distill"]["iteration"] == 2 and len(ck["optimizer_states"]) == 2
    other = Recorder({"student": "full", "critic": "lora"})
    other.roles["teacher"].source = {"path": "u", "sha256": "cd"}
    with pytest.raises(ValueError, match="trained with another teacher"):
        other.on_load_checkpoint(ck)


def test_nonfinite_steps_are_skipped_and_counted_then_stop_the_run():
    m = Recorder({"student": "full"}, nan_at={"student": {1, 2}})
    fit(m, 3)
    assert m.nonfinite["skipped"] == 2 and m.iteration == 5  # 3 good steps needed 5 iterations
    m = Recorder({"student": "full"}, nan_at={"student": set(range(100))})
    m.max_nonfinite = 3
    with pytest.raises(NonFiniteError, match="4 steps in a row had a non-finite loss"):
        fit(m, 3)


def test_schedule_validation():
    with pytest.raises(ValueError, match="increasing 'until'"):
        Schedule.from_config([{"until": 5, "cycle": [["a"]]}, {"until": 3, "cycle": [["b"]]}, {"cycle": [["c"]]}])
    m = Recorder({"student": "full"}, schedule=[{"until": None, "cycle": [["critic"]]}])
    with pytest.raises(ValueError, match="not trainable here: \\['critic'\\]"):
        m.schedule
    with pytest.raises(ValueError, match="unknown role 'generator'"):
        Role("generator", Tiny(), True, "scratch")


def test_schedule_iterations_for_optimizer_steps():
    """max_steps counts optimizer steps; the progress bar needs iterations (one step per stepping role)."""
    uni = Schedule.from_config([{"until": 80, "cycle": [["critic"]]}, {"until": None, "cycle": [["critic", "student"]]}])
    assert uni.iterations_for(720) == 400  # 80 warm-up iterations, then 320 of two steps
    assert uni.iterations_for(720 - 80 - 2 * 20, start=100) == 300  # resumed at iteration 100
    assert uni.iterations_for(81) == 81 and uni.iterations_for(82) == 81  # 81st iteration steps twice
    rcm = Schedule.from_config([{"until": None, "cycle": [["critic"]] * 5 + [["student"]]}])
    assert rcm.iterations_for(12) == 12
    assert Schedule.from_config([{"until": None, "cycle": [[]]}]).iterations_for(5) == float("inf")
