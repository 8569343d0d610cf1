"""The LightningModule base every distillation project shares (papers/README.md section 9).

A project declares its networks by role and writes one loss method per trainable role; the base
owns the rest:

* **roles** (:mod:`common.roles`): student, teacher, critic, discriminator, reward, reference, encoder, each
  with how it was initialised and whether it trains; one AdamW optimizer per trainable role from the
  config's ``roles.<name>`` section (lr, betas, eps, weight decay, gradient clipping, linear warm-up);
* **schedule**: which roles step at iteration ``i``, in named phases (the config's ``schedule:``);
* **manual optimization**: for each role of the current group, ``loss_<role>(batch, ctx)`` returns a
  :class:`RoleStep`, backpropagated into that role's optimizer only; its ``outputs`` reach the later
  roles of the iteration through ``ctx.outputs``;
* **non-finite guard**: a step whose loss or gradients are not finite on any rank is skipped on every
  rank (one all-reduce of the flag, so DDP never hangs) and counted; more than ``max_nonfinite`` in a
  row stop the run with an error;
* **student EMA** (ema-pytorch), updated only after student steps; samples come from it;
* **checkpoint state**: each tensor under one key; iteration, batches seen, skip counters; frozen
  roles loaded from a file are identified by path and SHA-256 (checked on load), not stored; frozen
  roles the run produced are stored; loading is strict.

Validation (sampling, metrics, grids, results.json) is :class:`common.validation.Validation`.
"""
from __future__ import annotations

import logging

import lightning as L
import torch
from ema_pytorch import EMA
from torch import Tensor, nn

from common.roles import ROLE_NAMES, Role, RoleConfig, RoleStep, Schedule, StepContext, role_configs

log = logging.getLogger(__name__)

__all__ = ["DistillationModule", "NonFiniteError", "Role", "RoleStep", "Schedule", "StepContext", "ROLE_NAMES"]


class NonFiniteError(RuntimeError):
    pass


class DistillationModule(L.LightningModule):
    """Base of every project's LightningModule; see the module docstring."""

    sampler = "multistep"  # students sample with common.sampling.sample_multistep

    def __init__(self, roles: dict | None = None, schedule: list | None = None, seed: int = 0,
                 ema_beta: float = 0.999, ema_warmup: bool = True, max_nonfinite: int = 20):
        super().__init__()
        self.automatic_optimization = False
        self.seed = seed
        self.ema_beta, self.ema_warmup, self.max_nonfinite = ema_beta, ema_warmup, max_nonfinite
        self.role_settings: dict[str, RoleConfig] = role_configs(roles)
        self._schedule = Schedule.from_config(schedule) if schedule else None
        self.roles: dict[str, Role] = {}
        self.nets = nn.ModuleDict()  # each network once, under the first role that holds it
        self.ema: EMA | None = None
        self.iteration = 0
        self.batches_seen = 0
        self.nonfinite = {"skipped": 0, "in_a_row": 0}
        self._logs_flushed = True  # whether the last step's logs went to the loggers (training_step)

    # ---------------------------------------------------------------- declaring roles
    def role_config(self, name: str) -> RoleConfig:
        return self.role_settings.get(name, RoleConfig())

    def add_role(self, name: str, net: nn.Module, init: str, trainable: bool = True, params=None,
                 source: dict | None = None) -> Role:
        """Declare ``net`` as role ``name``. Trainable roles take their optimizer settings from the
        config's ``roles.<name>``; frozen roles are put in eval mode without gradients."""
        if name in self.roles:
            raise ValueError(f"role {name!r} declared twice")
        role = Role(name, net, trainable, init, params, dict(source or {}), self.role_config(name))
        if not trainable:
            net.requires_grad_(False)
            net.eval()
        self.roles[name] = role
        if not any(m is net for m in self.nets.values()):  # a LoRA critic is its teacher's net
            self.nets[name] = net
        if name == "student" and trainable:
            # classic EMA with warm-up: ema-pytorch's decay 1 - (1 + e / 10)^-1 = e / (10 + e) after e
            # updates, capped at beta (papers/README.md section 9); without warm-up, beta from the start
            self.ema = EMA(net, beta=self.ema_beta, update_after_step=0, update_every=1,
                           include_online_model=False, power=1.0, inv_gamma=10.0 if self.ema_warmup else 1e-12)
        return role

    def trainable_roles(self) -> list[str]:
        return [n for n, r in self.roles.items() if r.trainable]

    @property
    def schedule(self) -> Schedule:
        if self._schedule is None:
            self._schedule = Schedule.from_config([{"name": "main", "cycle": [self.trainable_roles()]}])
        return self._schedule

    def check_roles(self) -> None:
        """After the roles are declared: the ``roles:`` and ``schedule:`` sections name trainable roles
        of this module only, and every trainable role has a loss."""
        from common.config import ConfigError

        mine = self.trainable_roles()
        unknown = sorted(set(self.role_settings) - set(mine))
        if unknown:
            raise ConfigError(f"roles section names {unknown}, which {type(self).__name__} does not train here "
                              f"(its trainable roles: {', '.join(mine) or 'none'})")
        stray = sorted(self.schedule.roles() - set(mine))
        if stray:
            raise ConfigError(f"schedule names roles that are not trainable here: {stray} "
                              f"(trainable: {', '.join(mine)})")
        idle = [n for n in mine if n not in self.schedule.roles()]
        if idle:
            raise ConfigError(f"the schedule never steps trainable role(s) {idle}: name them in a group of a "
                              f"phase's cycle, e.g. schedule.<phase>.cycle=[[{', '.join(mine)}]]")
        for name in mine:
            if getattr(self, f"loss_{name}", None) is None:
                raise NotImplementedError(f"{type(self).__name__} has no loss_{name}(batch, ctx)")

    # ---------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        self.check_roles()
        opts, scheds = [], []
        self._opt_index = {}
        seen: set[int] = set()
        for name in self.trainable_roles():
            r = self.roles[name]
            ps = r.trainable_params()
            for p in ps:  # e.g. LoRA adapters inside a module a frozen role also holds
                p.requires_grad_(True)
            if {id(p) for p in ps} & seen:
                raise ValueError(f"role {name!r} shares trainable parameters with another role's optimizer")
            seen |= {id(p) for p in ps}
            c = r.config
            groups = self._param_groups(name, ps)
            opt = torch.optim.AdamW([{"params": g, **self._group_options(c, ov)} for g, ov in groups])
            warm = max(c.warmup, 0)
            scheds.append(torch.optim.lr_scheduler.LambdaLR(opt, lambda s, w=warm: min(1.0, (s + 1) / w) if w else 1.0))
            self._opt_index[name] = len(opts)
            opts.append(opt)
        return opts, scheds

    def on_train_start(self):
        """Apply the roles config to the optimizers. On a fresh start this changes nothing; on a resume
        Lightning has restored the saved optimizer settings, and a change the user allowed
        (``run.resume_changes=allow``, common/runs.py) must take effect rather than be silently kept."""
        for name in self.trainable_roles():
            c, opt, sched = self.roles[name].config, self._optimizer(name), self._scheduler(name)
            wanted = [self._group_options(c, ov) for _, ov in self._param_groups(name, self.roles[name].trainable_params())]
            sched.base_lrs = [w["lr"] for w in wanted]
            for g, w, lam in zip(opt.param_groups, wanted, sched.lr_lambdas):
                g.update(initial_lr=w["lr"], **{**w, "lr": w["lr"] * lam(sched.last_epoch)})

    def param_groups(self, name: str, params: list) -> list[tuple[list, dict]]:
        """How role ``name``'s optimizer splits its parameters: ``(params, overrides)`` pairs, where an
        override (``lr``, ``betas``, ``eps``, ``weight_decay``) replaces the role's setting for that
        group. One group without overrides unless a method says otherwise (Uni-Instruct trains its
        discriminator head at its own learning rate inside the critic's optimizer)."""
        return [(params, {})]

    def _param_groups(self, name: str, params: list) -> list[tuple[list, dict]]:
        groups = [(g, ov) for g, ov in self.param_groups(name, params) if g]
        if sorted(id(p) for g, _ in groups for p in g) != sorted(id(p) for p in params):
            raise ValueError(f"param_groups({name!r}) must place each of the role's parameters in one group")
        bad = sorted(set().union(*(ov for _, ov in groups)) - {"lr", "betas", "eps", "weight_decay"})
        if bad:
            raise ValueError(f"param_groups({name!r}) overrides unknown optimizer settings {bad}")
        return groups

    @staticmethod
    def _group_options(c: RoleConfig, overrides: dict) -> dict:
        opts = {"lr": c.lr, "betas": c.betas, "eps": c.eps, "weight_decay": c.weight_decay, **overrides}
        return {**opts, "betas": tuple(opts["betas"])}  # a config list or an override tuple

    def _optimizer(self, name: str):
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        return opts[self._opt_index[name]]

    def _scheduler(self, name: str):
        s = self.lr_schedulers()
        s = s if isinstance(s, list) else [s]
        return s[self._opt_index[name]]

    # ---------------------------------------------------------------- the step
    def step_context(self, role: str, positions: Tensor, outputs: dict | None = None, repeat: int = 0) -> StepContext:
        return StepContext(self.iteration, self.schedule.phase_at(self.iteration).name, role, positions,
                           self.seed, {} if outputs is None else outputs, self.device, repeat)

    def training_step(self, batch, batch_idx):
        results = getattr(self._trainer, "_results", None) if self._trainer is not None else None
        if results is not None and self._logs_flushed:
            # a flush to the loggers shows only the roles that stepped since the last one: Lightning
            # logs a key's last value again at every flush until the epoch ends, and the data stream
            # never ends one (critic-only iterations would repeat the student's last loss)
            results.reset(metrics=False, fx="training_step")
        positions = batch[-1] if isinstance(batch, (list, tuple)) else torch.arange(len(batch))
        outputs: dict[str, dict] = {}  # a repeated role's latest step
        done: dict[str, int] = {}
        for name in self.schedule.roles_at(self.iteration):
            step = self._optimize(name, self.step_context(name, positions, outputs, done.get(name, 0)), batch)
            outputs[name] = step.outputs
            done[name] = done.get(name, 0) + 1
        self.iteration += 1
        self.batches_seen += 1
        connector = getattr(self._trainer, "_logger_connector", None) if self._trainer is not None else None
        self._logs_flushed = bool(connector.should_update_logs) if connector is not None else True
        world = self.trainer.world_size if self._trainer is not None else 1
        self.log_dict({"progress/iteration": float(self.iteration),
                       "progress/samples_seen": float(self.iteration * len(positions) * world)})

    def _all_ranks(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank: one all-reduce, so all ranks take the same branch."""
        if self._trainer is None:
            return ok
        return bool(self.trainer.strategy.reduce_boolean_decision(ok, all=True))

    def _optimize(self, name: str, ctx: StepContext, batch) -> RoleStep:
        role = self.roles[name]
        opt = self._optimizer(name)
        self.toggle_optimizer(opt)
        opt.zero_grad(set_to_none=True)
        step = getattr(self, f"loss_{name}")(batch, ctx)
        if not isinstance(step, RoleStep):
            raise TypeError(f"{type(self).__name__}.loss_{name} must return a RoleStep(loss, logs, outputs)")
        loss, logs = step.loss, dict(step.logs)
        finite = self._all_ranks(bool(torch.isfinite(loss).all()))
        logs[f"{name}/grad_norm"] = loss.detach().new_tensor(float("nan"))  # a skipped step has none
        if finite:
            self.manual_backward(loss)
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            clip = role.config.grad_clip
            norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
            finite = self._all_ranks(bool(torch.isfinite(norm)))
            logs[f"{name}/grad_norm"] = norm.detach()
        if finite:
            opt.step()
            self._scheduler(name).step()
            self.nonfinite["in_a_row"] = 0
            self.after_optimizer_step(name)
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
        # the mean over ranks: under DDP the figures are those of the global batch, as in one process
        self.log_dict({k: (v.float() if isinstance(v, Tensor) else v) for k, v in logs.items()}, sync_dist=True)
        return step

    def after_optimizer_step(self, name: str) -> None:
        """After role ``name`` took an optimizer step (not after a skipped one): the student's EMA update
        here; a method adds its own averages (Flash-DMD's EMA of the fake score)."""
        if name == "student" and self.ema is not None:
            self.ema.update()

    # ---------------------------------------------------------------- checkpoints
    def _identified_tensor_ids(self) -> set[int]:
        """Tensors of frozen roles loaded from a file (identified by hash, not stored), except those a
        trainable role trains (adapters inside a shared base)."""
        ids = set()
        for r in self.roles.values():
            if not r.trainable and r.source:
                ids |= {id(t) for t in r.net.parameters()} | {id(t) for t in r.net.buffers()}
        for r in self.roles.values():
            if r.trainable:
                ids -= {id(p) for p in r.trainable_params()}
        return ids

    def _identified_keys(self) -> set[str]:
        ids = self._identified_tensor_ids()
        return {k for k, t in self.state_dict(keep_vars=True).items() if id(t) in ids}

    def on_save_checkpoint(self, checkpoint):
        for k in self._identified_keys():
            checkpoint["state_dict"].pop(k, None)
        checkpoint["distill"] = {
            "iteration": self.iteration, "batches_seen": self.batches_seen, "nonfinite": dict(self.nonfinite),
            "frozen": {n: dict(r.source) for n, r in self.roles.items() if not r.trainable and r.source},
            "roles": {n: {"trainable": r.trainable, "init": r.init} for n, r in self.roles.items()},
            "schedule": self.schedule.to_config(),
        }

    def check_frozen_sources(self, checkpoint) -> None:
        for name, src in checkpoint.get("distill", {}).get("frozen", {}).items():
            mine = self.roles[name].source if name in self.roles else {}
            if src.get("sha256") and mine.get("sha256") and src["sha256"] != mine["sha256"]:
                raise ValueError(f"the checkpoint was trained with another {name} ({src.get('path')}, "
                                 f"sha256 {src['sha256'][:12]}) than this one ({mine.get('path')}, "
                                 f"sha256 {mine['sha256'][:12]})")

    def on_load_checkpoint(self, checkpoint):
        self.check_frozen_sources(checkpoint)
        state = checkpoint.get("distill", {})
        self.iteration = state.get("iteration", 0)
        self.batches_seen = state.get("batches_seen", 0)
        self.nonfinite = dict(state.get("nonfinite", self.nonfinite))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict, except for the frozen roles identified by file (they are not in checkpoints)."""
        own = set(self.state_dict(keep_vars=True))
        missing = sorted(own - set(state_dict) - self._identified_keys())
        unexpected = sorted(set(state_dict) - own)
        if strict and (missing or unexpected):
            def few(keys):
                return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            parts = ([f"missing {len(missing)} key(s): {few(missing)}"] if missing else []) + \
                    ([f"unexpected {len(unexpected)} key(s): {few(unexpected)}"] if unexpected else [])
            raise RuntimeError(f"checkpoint does not match {type(self).__name__}: " + "; ".join(parts))
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ---------------------------------------------------------------- sampling
    def validation_step(self, batch, batch_idx):
        """Empty: it makes Lightning run its validation loop, whose end the Validation callback measures."""

    def generator_denoiser(self):
        """The EMA student as a Denoiser (each project wraps its student)."""
        raise NotImplementedError
