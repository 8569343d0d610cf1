"""The LightningModule base every distillation project shares (papers/README.md section 9).

A project declares its networks by role and writes one loss method per trainable role; the base
owns the rest:

* **roles** (:class:`Role`): student, teacher, critic, discriminator, reward, with how each was
  initialised and whether it trains; one optimizer (Adam/AdamW) and linear-warm-up LR schedule per
  trainable role, and its own gradient clipping;
* **schedule** (:class:`Schedule`): which roles step at iteration ``i``: phases with an end
  iteration, each a cycle of groups (``[[student, critic]]`` steps both every iteration;
  ``[[critic]] * 4 + [[student]]`` steps one role per iteration, 4:1);
* **manual optimization**: for each role of the current group, ``loss_<role>(batch, ctx)`` is
  called, backpropagated into that role's optimizer only, and stepped;
* **non-finite guard**: a step whose loss or gradients are not finite is skipped and counted; more
  than ``max_nonfinite`` in a row stops the run with an error;
* **student EMA** (ema-pytorch), updated only after student steps; samples come from it;
* **checkpoint state**: iteration, batches seen, skip counters; frozen roles are not stored but
  identified by source path and SHA-256, checked on load;
* **random streams** keyed by (seed, iteration, purpose, global sample position), so a resumed
  run and a run on any number of ranks draw the same numbers.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import lightning as L
import torch
from ema_pytorch import EMA
from torch import Tensor, nn

from common.rng import keyed_generator

log = logging.getLogger(__name__)

ROLE_NAMES = ("student", "teacher", "critic", "discriminator", "reward")


@dataclass
class Role:
    name: str
    net: nn.Module
    trainable: bool
    init: str  # how it was initialised: "teacher", "scratch", "lora-on-teacher", ... (recorded)
    lr: float = 1e-4
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None  # max gradient norm, None: no clipping
    warmup_steps: int = 0  # linear LR warm-up, counted in this role's own steps
    params: Callable[[nn.Module], list] | None = None  # which parameters train (default: requires_grad ones)
    source: dict = field(default_factory=dict)  # frozen roles: {"path": ..., "sha256": ...}

    def __post_init__(self):
        if self.name not in ROLE_NAMES:
            raise ValueError(f"unknown role {self.name!r}; expected one of {ROLE_NAMES}")

    def trainable_params(self) -> list:
        ps = self.params(self.net) if self.params else [p for p in self.net.parameters() if p.requires_grad]
        if self.trainable and not ps:
            raise ValueError(f"role {self.name!r} is trainable but has no trainable parameters")
        return ps


@dataclass
class Phase:
    until: int | None  # first iteration after this phase (None: to the end)
    cycle: list  # list of groups; iteration i uses cycle[(i - phase start) % len(cycle)]


class Schedule:
    """Which roles take an optimizer step at each iteration."""

    def __init__(self, phases: list[Phase]):
        if not phases:
            raise ValueError("a schedule needs at least one phase")
        ends = [p.until for p in phases[:-1]]
        if any(e is None for e in ends) or ends != sorted(ends):
            raise ValueError("schedule phases need increasing 'until' iterations; only the last may be open")
        self.phases = phases

    @classmethod
    def from_config(cls, spec: list) -> "Schedule":
        """``[{"until": 1000, "cycle": [["student"]]}, {"until": None, "cycle": [["critic"], ["student"]]}]``"""
        return cls([Phase(p.get("until"), [list(g) for g in p["cycle"]]) for p in spec])

    def phase_index(self, it: int) -> int:
        for i, p in enumerate(self.phases):
            if p.until is None or it < p.until:
                return i
        return len(self.phases) - 1

    def roles_at(self, it: int) -> list[str]:
        i = self.phase_index(it)
        start = self.phases[i - 1].until if i else 0
        cycle = self.phases[i].cycle
        return list(cycle[(it - start) % len(cycle)])

    def roles(self) -> set[str]:
        return {r for p in self.phases for g in p.cycle for r in g}

    def iterations_for(self, steps: int, start: int = 0) -> int | float:
        """How many iterations from ``start`` take ``steps`` optimizer steps (one per stepping role);
        ``inf`` when the open last phase steps no role."""
        if not any(self.phases[-1].cycle):
            return float("inf")
        it = start
        while steps > 0:
            steps -= len(self.roles_at(it))
            it += 1
        return it - start


@dataclass
class StepContext:
    """What a role's loss function is told about the current step."""

    iteration: int
    phase: int
    role: str
    positions: Tensor  # global sample positions of the batch (for keyed randomness)


class NonFiniteError(RuntimeError):
    pass


class DistillationModule(L.LightningModule):
    """Base of every project's LightningModule; see the module docstring."""

    sampler = "multistep"  # students sample with common.sampling.sample_multistep

    def __init__(self, seed: int = 0, ema_beta: float = 0.999, ema_warmup: bool = True, max_nonfinite: int = 20,
                 schedule: list | None = None, val_steps: list | None = None, val_num_samples: int = 500,
                 dataset: str = "mnist"):
        super().__init__()
        self.val_steps = [1] if val_steps is None else list(val_steps)  # [] turns sampling off
        self.val_num_samples, self.dataset = val_num_samples, dataset
        self.automatic_optimization = False
        self.strict_loading = False  # frozen roles are not in checkpoints
        self.seed = seed
        self.ema_beta, self.ema_warmup, self.max_nonfinite = ema_beta, ema_warmup, max_nonfinite
        self.schedule_spec = schedule
        self.roles: dict[str, Role] = {}
        self.nets = nn.ModuleDict()
        self.ema: EMA | None = None
        self.iteration = 0
        self.batches_seen = 0
        self.nonfinite = {"skipped": 0, "in_a_row": 0}

    # ---------------------------------------------------------------- declaring roles
    def add_role(self, role: Role) -> Role:
        if role.name in self.roles:
            raise ValueError(f"role {role.name!r} declared twice")
        if not role.trainable:
            role.net.requires_grad_(False)
            role.net.eval()
        self.roles[role.name] = role
        self.nets[role.name] = role.net
        if role.name == "student" and role.trainable:
            # classic EMA with warm-up: ema-pytorch's decay 1 - (1 + e / 10)^-1 = e / (10 + e) after e
            # updates, capped at beta (papers/README.md section 9); without warm-up, beta from the start
            self.ema = EMA(role.net, beta=self.ema_beta, update_after_step=0, update_every=1,
                           include_online_model=False, power=1.0, inv_gamma=10.0 if self.ema_warmup else 1e-12)
        return role

    def trainable_roles(self) -> list[str]:
        return [n for n, r in self.roles.items() if r.trainable]

    @property
    def schedule(self) -> Schedule:
        if not hasattr(self, "_schedule"):
            spec = self.schedule_spec or [{"until": None, "cycle": [self.trainable_roles()]}]
            self._schedule = Schedule.from_config(spec)
            unknown = self._schedule.roles() - set(self.trainable_roles())
            if unknown:
                raise ValueError(f"schedule names roles that are not trainable here: {sorted(unknown)}")
        return self._schedule

    # ---------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        opts, scheds = [], []
        self._opt_index = {}
        seen: set[int] = set()
        for name in self.trainable_roles():
            r = self.roles[name]
            ps = r.trainable_params()
            for p in ps:  # e.g. LoRA adapters inside a module a frozen role also holds
                p.requires_grad_(True)
            overlap = {id(p) for p in ps} & seen
            if overlap:
                raise ValueError(f"role {name!r} shares trainable parameters with another role's optimizer")
            seen |= {id(p) for p in ps}
            opt = torch.optim.AdamW(ps, lr=r.lr, betas=tuple(r.betas), eps=r.eps, weight_decay=r.weight_decay)
            warm = max(r.warmup_steps, 0)
            scheds.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda s, w=warm: min(1.0, (s + 1) / w) if w else 1.0))
            self._opt_index[name] = len(opts)
            opts.append(opt)
        return opts, scheds

    def _optimizer(self, name: str):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        return opts[self._opt_index[name]]

    def _scheduler(self, name: str):
        s = self.lr_schedulers()
        s = s if isinstance(s, list) else [s]
        return s[self._opt_index[name]]

    # ---------------------------------------------------------------- randomness
    def generator(self, purpose: int, position: int | None = None) -> torch.Generator:
        """A generator keyed by (seed, iteration, purpose[, global sample position])."""
        keys = (self.seed, self.iteration, purpose) + (() if position is None else (int(position),))
        return keyed_generator(*keys)

    def randn_per_sample(self, positions: Tensor, shape, purpose: int, dtype=torch.float32) -> Tensor:
        """Standard normal noise, one draw per sample keyed by its global position."""
        return torch.stack([torch.randn(shape, generator=self.generator(purpose, p), dtype=dtype)
                            for p in positions.tolist()]).to(self.device)

    def rand_per_sample(self, positions: Tensor, purpose: int, dtype=torch.float32) -> Tensor:
        return torch.stack([torch.rand((), generator=self.generator(purpose, p), dtype=dtype)
                            for p in positions.tolist()]).to(self.device)

    # ---------------------------------------------------------------- the step
    def training_step(self, batch, batch_idx):
        positions = batch[-1] if isinstance(batch, (list, tuple)) else torch.arange(len(batch))
        phase = self.schedule.phase_index(self.iteration)
        for name in self.schedule.roles_at(self.iteration):
            ctx = StepContext(self.iteration, phase, name, positions)
            self._optimize(name, ctx, batch)
        self.iteration += 1
        self.batches_seen += 1

    def _optimize(self, name: str, ctx: StepContext, batch) -> None:
        role = self.roles[name]
        opt = self._optimizer(name)
        loss_fn = getattr(self, f"loss_{name}", None)
        if loss_fn is None:
            raise NotImplementedError(f"{type(self).__name__} has no loss_{name}(batch, ctx)")
        self.toggle_optimizer(opt)
        opt.zero_grad(set_to_none=True)
        loss, logs = loss_fn(batch, ctx)
        finite = bool(torch.isfinite(loss).all())
        if finite:
            self.manual_backward(loss)
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, role.grad_clip if role.grad_clip else float("inf"))
            finite = bool(torch.isfinite(norm))
            logs[f"{name}/grad_norm"] = norm.detach()
        if finite:
            opt.step()
            self._scheduler(name).step()
            self.nonfinite["in_a_row"] = 0
            if name == "student" and self.ema is not None:
                self.ema.update()
        else:
            opt.zero_grad(set_to_none=True)
            self.nonfinite["skipped"] += 1
            self.nonfinite["in_a_row"] += 1
            log.warning("iteration %d: non-finite %s loss or gradient; step skipped (%d skipped in total)",
                        self.iteration, name, self.nonfinite["skipped"])
            if self.nonfinite["in_a_row"] > self.max_nonfinite:
                raise NonFiniteError(f"{self.nonfinite['in_a_row']} steps in a row had a non-finite loss or "
                                     f"gradient (last: role {name!r} at iteration {self.iteration}); stopping")
        self.untoggle_optimizer(opt)
        logs[f"{name}/loss"] = loss.detach()
        logs["nonfinite_skipped"] = float(self.nonfinite["skipped"])
        self.log_dict({k: (v.float() if isinstance(v, Tensor) else v) for k, v in logs.items()})

    # ---------------------------------------------------------------- checkpoints
    def _frozen_tensor_ids(self) -> set[int]:
        """Tensors of frozen roles, except those some trainable role trains (shared-base adapters)."""
        ids = set()
        for r in self.roles.values():
            if not r.trainable:
                ids |= {id(t) for t in r.net.parameters()} | {id(t) for t in r.net.buffers()}
        for r in self.roles.values():
            if r.trainable:
                ids -= {id(p) for p in r.trainable_params()}
        return ids

    def on_save_checkpoint(self, checkpoint):
        frozen = self._frozen_tensor_ids()
        names = [n for n, t in list(self.named_parameters(remove_duplicate=False)) +
                 list(self.named_buffers(remove_duplicate=False)) if id(t) in frozen]
        for n in names:
            checkpoint["state_dict"].pop(n, None)
        checkpoint["distill"] = {
            "iteration": self.iteration, "batches_seen": self.batches_seen, "nonfinite": dict(self.nonfinite),
            "frozen": {n: dict(r.source) for n, r in self.roles.items() if not r.trainable},
        }

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("distill", {})
        for name, src in state.get("frozen", {}).items():
            mine = self.roles[name].source if name in self.roles else {}
            if src.get("sha256") and mine.get("sha256") and src["sha256"] != mine["sha256"]:
                raise ValueError(f"the checkpoint was trained with another {name} ({src.get('path')}, "
                                 f"sha256 {src['sha256'][:12]}) than this one ({mine.get('path')}, "
                                 f"sha256 {mine['sha256'][:12]})")
        self.iteration = state.get("iteration", 0)
        self.batches_seen = state.get("batches_seen", 0)
        self.nonfinite = dict(state.get("nonfinite", self.nonfinite))

    # ---------------------------------------------------------------- sampling and validation
    def generator_denoiser(self):
        """The EMA student as a Denoiser (each project wraps its student)."""
        raise NotImplementedError

    def validation_step(self, batch, batch_idx):
        pass

    def measure(self, steps: int, num_samples: int | None) -> tuple[dict, Tensor]:
        """Quality of the EMA student at ``steps`` under the pinned protocol (seed, labels)."""
        from common.checkpoints import Generator
        from common.evaluation import draw, is_image_model
        from common.metrics import evaluator

        gen = Generator(self.generator_denoiser().eval(), self.sampler, "training", False)
        x, labels = draw(gen, steps, None, num_samples=num_samples)
        res = evaluator.evaluate_images(x, labels) if is_image_model(gen.denoiser) else \
            evaluator.evaluate_points(x, self.dataset)
        return res, x

    def on_train_end(self):
        """Final figures under the full protocol (its sample count, so the floor applies): results.json."""
        if self.trainer.global_rank != 0 or not self.val_steps:
            return
        import json
        from pathlib import Path

        rows = []
        for n in self.val_steps:
            res, x = self.measure(n, None)
            rows.append({"steps": n, **res})
            self._save_samples(x, Path(self.trainer.default_root_dir) / "samples" / f"final_{n}step.png", n)
        path = Path(self.trainer.default_root_dir) / "results.json"
        tmp = path.with_name("results.json.tmp")
        tmp.write_text(json.dumps({"iteration": self.iteration, "results": rows}, indent=2))
        tmp.replace(path)

    def on_validation_epoch_end(self):
        if self.trainer.sanity_checking or self.trainer.global_rank != 0:
            return
        from pathlib import Path

        out = Path(self.trainer.default_root_dir) / "samples"
        for n in self.val_steps:
            res, x = self.measure(n, self.val_num_samples)
            keys = ("fd", "accuracy", "precision", "recall") if "fd" in res else ("swd", "modes_covered")
            self.log_dict({f"val/{k}_{n}step": float(res[k]) for k in keys if k in res}, rank_zero_only=True)
            self._save_samples(x, out / f"it{self.iteration:07d}_{n}step.png", n)

    def _save_samples(self, x: Tensor, name, steps: int) -> None:
        """A PNG: the first 100 images as a 10x10 grid (one column per class), or a 2-D scatter."""
        from common.images import save_grid, save_scatter

        if x.ndim == 4:
            save_grid(x[:100], name, nrow=10)
        else:
            save_scatter(x, name, title=f"iteration {self.iteration}, {steps} step(s)")

