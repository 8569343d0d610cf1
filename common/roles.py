"""Roles, their optimizer settings, the update schedule between them, and the step context.

A project declares its networks by role (:class:`Role`); each trainable role's optimizer comes from
the config's ``roles:`` section (:class:`RoleConfig`); the ``schedule:`` section (:class:`Schedule`)
says which roles take an optimizer step at each iteration, in named phases. A role's loss gets a
:class:`StepContext` and returns a :class:`RoleStep`; what it returns in ``outputs`` reaches the later
roles of the same iteration through ``ctx.outputs[role]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from common.rng import rand_per_sample, randn_per_sample

ROLE_NAMES = ("student", "teacher", "critic", "discriminator", "reward", "reference", "encoder")  # append only: the index keys draws
CRITIC_INITS = ("copy", "lora")


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    targets: list | None = None  # names of the Linear layers that get adapters (None: the net's default)


@dataclass
class RoleConfig:
    """``roles.<name>`` of a run config: one trainable role's optimizer (AdamW) and initialisation."""

    lr: float = 1e-4
    betas: list = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = None  # max gradient norm of this role's parameters; None: no clipping
    warmup: int = 0  # linear LR warm-up over this role's first optimizer steps
    init: str = "copy"  # critics: "copy" (a full trainable copy of the teacher) or "lora" (adapters on it)
    lora: dict = field(default_factory=dict)  # LoraConfig keys, for init: lora

    def lora_config(self) -> LoraConfig:
        return LoraConfig(**self.lora)


def role_configs(spec: dict | None) -> dict[str, RoleConfig]:
    """Check a ``roles:`` section: known role names, known keys of the right types."""
    from common.config import ConfigError, check_dataclass

    out = {}
    for name, sec in (spec or {}).items():
        if sec is None:  # ``roles.critic=null`` removes a role's section (e.g. SwiftBrush's SDS variant)
            continue
        if name not in ROLE_NAMES:
            raise ConfigError(f"unknown role 'roles.{name}'; roles are {', '.join(ROLE_NAMES)}")
        if isinstance(sec, RoleConfig):
            out[name] = sec
            continue
        vals = check_dataclass(f"roles.{name}", dict(sec or {}), RoleConfig)
        if vals["init"] not in CRITIC_INITS:
            raise ConfigError(f"config key 'roles.{name}.init' must be one of {list(CRITIC_INITS)}, "
                              f"got {vals['init']!r}")
        vals["lora"] = check_dataclass(f"roles.{name}.lora", dict(vals["lora"] or {}), LoraConfig)
        vals["betas"] = list(vals["betas"])
        out[name] = RoleConfig(**vals)
    return out


@dataclass
class Role:
    """A network by role. Frozen roles loaded from a file carry ``source`` ({path, sha256}) and are
    identified, not stored, in checkpoints; frozen roles without a source (made by the run itself, e.g.
    a ``reference`` copy of the student) are stored."""

    name: str
    net: nn.Module
    trainable: bool
    init: str  # how it was initialised: "teacher", "copy", "lora", "scratch", ... (recorded)
    params: Callable[[nn.Module], list] | None = None  # which parameters train (default: requires_grad ones)
    source: dict = field(default_factory=dict)
    config: RoleConfig = field(default_factory=RoleConfig)  # optimizer settings (trainable roles)

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
    name: str
    until: int | None  # first iteration after this phase (None: to the end)
    cycle: list  # list of groups; iteration i uses cycle[(i - phase start) % len(cycle)]


PHASE_KEYS = {"name", "until", "cycle"}


class Schedule:
    """Which roles take an optimizer step at each iteration, in named phases. A group may name a role
    more than once (``[critic, discriminator, discriminator, student]``): it steps that many times, in
    that order, each step with its own random draws (``StepContext.repeat``)."""

    def __init__(self, phases: list[Phase]):
        if not phases:
            raise ValueError("a schedule needs at least one phase")
        ends = [p.until for p in phases[:-1]]
        if any(e is None for e in ends) or ends != sorted(ends) or len(set(ends)) != len(ends):
            raise ValueError("schedule phases need increasing 'until' iterations; only the last may be open")
        names = [p.name for p in phases]
        if len(set(names)) != len(names):
            raise ValueError(f"schedule phase names repeat: {names}")
        self.phases = phases

    @classmethod
    def from_config(cls, spec: list) -> "Schedule":
        """``[{name: warmup, until: 80, cycle: [[critic]]}, {name: main, cycle: [[critic, student]]}]``;
        ``until`` is the iteration the phase ends before (omitted or null for the last phase)."""
        from common.config import ConfigError

        if not isinstance(spec, (list, tuple)) or not spec:
            raise ConfigError("config section 'schedule' must be a non-empty list of phases "
                              "({name, until, cycle})")
        phases = []
        for i, p in enumerate(spec):
            if not isinstance(p, dict):
                raise ConfigError(f"schedule[{i}] must be a mapping with keys {sorted(PHASE_KEYS)}")
            unknown = set(p) - PHASE_KEYS
            if unknown:
                raise ConfigError(f"unknown config key(s) {sorted(unknown)} in schedule[{i}] "
                                  f"(a phase has {sorted(PHASE_KEYS)})")
            if "cycle" not in p:
                raise ConfigError(f"schedule[{i}] needs a 'cycle' (a list of groups of roles)")
            cycle = p["cycle"]
            if not isinstance(cycle, (list, tuple)) or not cycle or \
                    not all(isinstance(g, (list, tuple)) for g in cycle):
                raise ConfigError(f"schedule[{i}].cycle must be a non-empty list of lists of roles, e.g. "
                                  f"[[critic], [student]], got {cycle!r}")
            until = p.get("until")
            if until is not None and (not isinstance(until, int) or isinstance(until, bool) or until < 1):
                raise ConfigError(f"schedule[{i}].until must be a positive iteration or null, got {until!r}")
            phases.append(Phase(str(p.get("name", "main" if len(spec) == 1 else f"phase{i}")), until,
                                [list(g) for g in cycle]))
        try:
            return cls(phases)
        except ValueError as e:
            raise ConfigError(f"schedule: {e}") from None

    def phase_index(self, it: int) -> int:
        for i, p in enumerate(self.phases):
            if p.until is None or it < p.until:
                return i
        return len(self.phases) - 1

    def phase_at(self, it: int) -> Phase:
        return self.phases[self.phase_index(it)]

    def start_of(self, name: str) -> int:
        i = [p.name for p in self.phases].index(name)
        return self.phases[i - 1].until if i else 0

    def roles_at(self, it: int) -> list[str]:
        i = self.phase_index(it)
        start = self.phases[i - 1].until if i else 0
        cycle = self.phases[i].cycle
        return list(cycle[(it - start) % len(cycle)])

    def roles(self) -> set[str]:
        return {r for p in self.phases for g in p.cycle for r in g}

    def steps_per_role(self, iterations: int, start: int = 0) -> dict[str, int]:
        """Optimizer steps each role takes in iterations ``start, ..., iterations - 1``, counted per phase
        without walking the iterations (a paper-scale run has millions)."""
        def hits(m: int, j: int, period: int) -> int:  # x in [0, m) with x % period == j
            return max(0, (m - j + period - 1) // period)

        counts: dict[str, int] = {}
        lo = 0
        for p in self.phases:
            hi = iterations if p.until is None else p.until
            a, b = max(lo, start), min(hi, iterations)
            for j, group in enumerate(p.cycle if b > a else []):
                n = hits(b - lo, j, len(p.cycle)) - hits(a - lo, j, len(p.cycle))
                for r in group:
                    counts[r] = counts.get(r, 0) + n
            lo = hi
        return counts

    def steps_for(self, iterations: int, start: int = 0) -> int:
        """Optimizer steps taken by iterations ``start, ..., iterations - 1`` (one per stepping role)."""
        return sum(self.steps_per_role(iterations, start).values())

    def to_config(self) -> list:
        return [{"name": p.name, "until": p.until, "cycle": [list(g) for g in p.cycle]} for p in self.phases]


@dataclass
class RoleStep:
    """What a role's loss returns: the loss to backpropagate into that role's optimizer, scalars to log,
    and tensors later roles of the same iteration may use (``ctx.outputs[role][key]``)."""

    loss: Tensor
    logs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)


@dataclass
class StepContext:
    """What a role's loss is told about the current step.

    Random draws through :meth:`randn` / :meth:`rand` are keyed by (seed, iteration, role, purpose,
    global sample position), so they do not depend on the rank, the worker or the batch split, and a
    resumed run draws the same numbers."""

    iteration: int
    phase: str
    role: str
    positions: Tensor  # global sample positions of the batch
    seed: int = 0
    outputs: dict = field(default_factory=dict)  # role -> RoleStep.outputs of earlier roles this iteration
    device: torch.device | str = "cpu"
    repeat: int = 0  # 0 for the role's first step in this iteration, 1 for its second, ... (a group may repeat a role)

    def output(self, role: str, key: str, make: Callable[[], Tensor] | None = None) -> Tensor:
        """``outputs[role][key]``, or ``make()`` when that role did not step earlier in this iteration
        (e.g. a critic step in an iteration without a student step)."""
        if key in self.outputs.get(role, {}):
            return self.outputs[role][key]
        if make is None:
            raise KeyError(f"role {role!r} produced no {key!r} before {self.role!r} in iteration {self.iteration}")
        return make()

    def _keys(self, purpose: int) -> tuple:
        keys = (self.seed, self.iteration, ROLE_NAMES.index(self.role), int(purpose))
        return keys + (self.repeat,) if self.repeat else keys  # a repeated step draws afresh

    def randn(self, purpose: int, shape=(), positions: Tensor | None = None, dtype=torch.float32) -> Tensor:
        """Standard normal ``(B, *shape)``, one keyed draw per sample."""
        pos = self.positions if positions is None else positions
        return randn_per_sample(self._keys(purpose), pos.cpu(), tuple(shape), dtype).to(self.device)

    def rand(self, purpose: int, positions: Tensor | None = None, dtype=torch.float32) -> Tensor:
        """Uniform on [0, 1), ``(B,)``, one keyed draw per sample."""
        pos = self.positions if positions is None else positions
        return rand_per_sample(self._keys(purpose), pos.cpu(), dtype).to(self.device)
