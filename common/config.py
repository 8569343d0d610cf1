"""One strict config mechanism (omegaconf): load YAML, apply ``key=value`` overrides, validate.

A run config has these sections:

``module`` / ``data``   ``target: dotted.path.Class`` plus the keyword arguments of its ``__init__``;
                        keys and types are checked against the signature, defaults are filled in.
``roles``               distillation modules: ``<role>: RoleConfig`` (optimizer settings, critic init).
``schedule``            distillation modules: the named phases, ``[{name, until, cycle}, ...]``.
``validation``          distillation modules: :class:`common.validation.ValidationConfig`.
``trainer``             keyword arguments of ``lightning.Trainer`` (``max_steps`` is derived, never set).
``run``                 :class:`RunConfig` (run directory, seed, iterations, checkpoints, logging).
``slurm``               :class:`common.slurm_config.SlurmConfig`-like section, read by launchers/slurm.py.

An unknown key or a value of the wrong type is a :class:`ConfigError` naming the key.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    dir: str = ""  # default: runs/<config stem>
    seed: int = 0
    iterations: int = 0  # the run's length; trainer.max_steps (optimizer steps) is derived from it
    resume: str = "auto"  # "auto": the newest readable checkpoint of dir if any; "never"; or a checkpoint path
    overwrite: bool = False  # a fresh start into a dir holding a run moves that run aside to <dir>.previous-<n>
    resume_changes: typing.Literal["refuse", "allow"] = "refuse"  # config changes on resume (common/runs.py)
    ckpt_every: int = 500  # iterations between periodic checkpoints
    wandb: bool = False  # offline mode; sync later with `wandb sync`
    export: str = ""  # recipes: weights file written at the end (relative paths: inside run.dir)
    notes: str = ""


@dataclass
class SlurmConfig:
    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem: str = ""
    time: str = "01:00:00"
    partition: str = ""
    account: str = ""
    extra: list = field(default_factory=list)  # raw "#SBATCH ..." option strings, e.g. "--qos=high"
    setup: list = field(default_factory=list)  # shell lines run before the job (module load, venv)


SECTIONS = ("module", "data", "roles", "schedule", "validation", "trainer", "run", "slurm")
DISTILL_SECTIONS = ("roles", "schedule", "validation")


def locate(path: str):
    module, _, name = path.rpartition(".")
    if not module:
        raise ConfigError(f"target {path!r} is not a dotted path")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot import target {path!r}: {e}") from None


def _signature_params(fn, cls=None) -> dict[str, tuple[Any, Any]]:
    """name -> (annotation, default) of a callable's keyword parameters. A class whose ``__init__``
    forwards ``**kwargs`` also accepts its base classes' parameters (the nearest definition wins)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations are then unchecked
        hints = {}
    out, forwards = {}, False
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind == p.VAR_KEYWORD:
            forwards = True
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = (hints.get(name, Any), p.default)
    if forwards and cls is not None:
        for base in cls.__mro__[1:]:
            if "__init__" in vars(base) and base.__module__.split(".")[0] in ("common", "projects"):
                for k, v in _signature_params(base.__init__, base).items():
                    out.setdefault(k, v)
                break
    return out


def _type_ok(value, ann) -> bool:
    if ann is Any or ann is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(ann))
    if ann is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(ann)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is bool:
        return isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if origin in (list, tuple, typing.Sequence) or ann in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or ann is dict:
        return isinstance(value, dict)
    return True  # other classes (callables, tensors) are not set from YAML


_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _yaml11_float(value, ann):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; where a float is expected, take it as the float."""
    if isinstance(value, str) and _FLOAT_RE.match(value) and not _type_ok(value, ann) and _type_ok(1.0, ann):
        return float(value)
    return value


def _type_name(ann) -> str:
    if typing.get_origin(ann) is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "None"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def _wrong(key: str, v, ann) -> str:
    if typing.get_origin(ann) is typing.Literal:  # a choice: name the value, not its type
        return f"config key '{key}' is {v!r}; expected {_type_name(ann)}"
    return f"config key '{key}' has type {type(v).__name__}, expected {_type_name(ann)} (got {v!r})"


def _check_kwargs(section: str, values: dict, params: dict, owner: str) -> dict:
    out = {}
    for k, v in values.items():
        if k not in params:
            raise ConfigError(f"unknown config key '{section}.{k}' ({owner} accepts: {', '.join(sorted(params))})")
        ann = params[k][0]
        v = _yaml11_float(v, ann)
        if not _type_ok(v, ann):
            raise ConfigError(_wrong(f"{section}.{k}", v, ann))
        out[k] = v
    for k, (_, default) in params.items():
        if k not in out:
            if default is inspect.Parameter.empty:
                raise ConfigError(f"missing required config key '{section}.{k}' for {owner}")
            out[k] = default
    return out


def _defaults_jsonable(d: dict) -> dict:
    """Drop defaults that YAML cannot hold (callables, objects) from the resolved view."""
    ok = (type(None), bool, int, float, str, list, tuple, dict)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items() if isinstance(v, ok)}


def _check_target_section(name: str, sec: dict) -> dict:
    if "target" not in sec:
        raise ConfigError(f"config section '{name}' needs a 'target: dotted.path.Class'")
    target = sec["target"]
    cls = locate(target)
    kwargs = {k: v for k, v in sec.items() if k != "target"}
    params = _signature_params(cls.__init__, cls) if inspect.isclass(cls) else _signature_params(cls)
    resolved = _check_kwargs(name, kwargs, params, target)
    return {"target": target, **_defaults_jsonable(resolved)}


def check_dataclass(name: str, sec: dict, cls) -> dict:
    params = {f.name: (f.type if not isinstance(f.type, str) else typing.get_type_hints(cls)[f.name],
                       f.default if f.default is not dataclasses.MISSING else f.default_factory())
              for f in dataclasses.fields(cls)}
    return _check_kwargs(name, sec, params, name)


def _trainer_params() -> dict:
    import lightning

    params = _signature_params(lightning.Trainer.__init__)
    # the launcher owns these: they are set from the run section
    for k in ("logger", "callbacks", "plugins", "default_root_dir", "enable_checkpointing"):
        params.pop(k, None)
    return params


def is_distillation(target: str) -> bool:
    from common.module import DistillationModule

    cls = locate(target)
    return inspect.isclass(cls) and issubclass(cls, DistillationModule)


def _check_distill_sections(cfg: dict, target: str) -> dict:
    """roles / schedule / validation: checked for distillation modules, refused for other modules."""
    from common.roles import Schedule, role_configs
    from common.validation import ValidationConfig

    if not is_distillation(target):
        given = [s for s in DISTILL_SECTIONS if cfg.get(s)]
        if given:
            raise ConfigError(f"config section(s) {given} apply to distillation modules only; "
                              f"{target} is not one")
        return {}
    for key in ("roles", "schedule"):
        if key in cfg["module"]:
            raise ConfigError(f"config key 'module.{key}' belongs in the top-level '{key}:' section")
    roles = cfg.get("roles") or {}
    if not isinstance(roles, dict):
        raise ConfigError("config section 'roles' must map role names to their settings")
    out = {"roles": {}}
    roles = {n: v for n, v in roles.items() if v is not None}
    for n, r in role_configs(roles).items():
        d = dataclasses.asdict(r)
        if n != "critic":  # only a critic has an initialisation to choose
            given = [k for k in ("init", "lora") if k in (roles[n] or {})]
            if given:
                raise ConfigError(f"config key 'roles.{n}.{given[0]}' applies to the critic only")
            d.pop("init"), d.pop("lora")
        out["roles"][n] = d
    if cfg.get("schedule"):
        out["schedule"] = Schedule.from_config(cfg["schedule"]).to_config()
    out["validation"] = check_dataclass("validation", dict(cfg.get("validation") or {}), ValidationConfig)
    return out


def _seeded(sec: dict, seed: int) -> dict:
    """``run.seed`` is the training seed: a module or data target that takes a ``seed`` and is not given
    one explicitly gets it."""
    if "target" in sec and "seed" not in sec:
        cls = locate(sec["target"])
        params = _signature_params(cls.__init__, cls) if inspect.isclass(cls) else _signature_params(cls)
        if "seed" in params:
            sec["seed"] = seed
    return sec


def validate(cfg: dict) -> dict:
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected {list(SECTIONS)}")
    for required in ("module", "data"):
        if required not in cfg:
            raise ConfigError(f"config needs a '{required}' section")
    for name in ("module", "data", "roles", "validation", "trainer", "run", "slurm"):
        if cfg.get(name) is not None and not isinstance(cfg[name], dict):
            raise ConfigError(f"config section '{name}' must be a mapping of keys, got {cfg[name]!r}")
    if cfg.get("schedule") is not None and not isinstance(cfg["schedule"], list):
        raise ConfigError(f"config section 'schedule' must be a list of phases, got {cfg['schedule']!r}")
    run = check_dataclass("run", dict(cfg.get("run") or {}), RunConfig)
    module, data = (_seeded(dict(cfg[s] or {}), run["seed"]) for s in ("module", "data"))
    out = {
        "module": _check_target_section("module", module),
        "data": _check_target_section("data", data),
        **_check_distill_sections(cfg, cfg["module"]["target"]),
        "run": run,
        "slurm": check_dataclass("slurm", dict(cfg.get("slurm") or {}), SlurmConfig),
    }
    if "roles" in out:  # given as sections of their own, not as module arguments
        out["module"].pop("roles", None), out["module"].pop("schedule", None)
    tp = _trainer_params()
    trainer = dict(cfg.get("trainer") or {})
    for k, v in trainer.items():
        if k in ("max_steps", "max_epochs", "max_time"):
            raise ConfigError(f"config key 'trainer.{k}' is not set by hand: a run's length is "
                              f"run.iterations (trainer.max_steps is derived from it and the schedule)")
        if k not in tp:
            raise ConfigError(f"unknown config key 'trainer.{k}' (not an argument of lightning.Trainer "
                              f"or set by the launcher)")
        v = trainer[k] = _yaml11_float(v, tp[k][0])
        if not _type_ok(v, tp[k][0]):
            raise ConfigError(_wrong(f"trainer.{k}", v, tp[k][0]))
    out["trainer"] = trainer
    if out["run"]["iterations"] < 1:
        raise ConfigError(f"config key 'run.iterations' must be a positive number of iterations, "
                          f"got {out['run']['iterations']}")
    for key, low in (("batch_size", 1), ("num_workers", 0)):  # every data module's, where it has one
        v = out["data"].get(key)
        if isinstance(v, int) and v < low:
            raise ConfigError(f"config key 'data.{key}' must be at least {low}, got {v}")
    if out["run"]["ckpt_every"] < 1:
        raise ConfigError(f"config key 'run.ckpt_every' must be positive, got {out['run']['ckpt_every']}")
    return out


def build_module(cfg: dict):
    """The LightningModule of a resolved config; a distillation module gets the roles and schedule
    sections and has its roles checked against them."""
    if not is_distillation(cfg["module"]["target"]):
        return instantiate(cfg["module"])
    module = instantiate(cfg["module"], roles=cfg.get("roles") or {}, schedule=cfg.get("schedule"))
    module.check_roles()
    return module


def _parse_value(text: str):
    return OmegaConf.to_container(OmegaConf.create({"v": _yaml_scalar(text)}))["v"]


def _yaml_scalar(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        key, _, text = ov.partition("=")
        if key.split(".")[0] not in SECTIONS:
            raise ConfigError(f"unknown config key '{key}': overrides start with one of {list(SECTIONS)}")
        OmegaConf.update(cfg, key, _parse_value(text), merge=True, force_add=True)
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Load, override and validate a run config; returns the resolved config as a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    cfg = _load_yaml(path)
    base = cfg.pop("base", None) if "base" in cfg else None
    if base:  # a thin overlay on another config, relative to this file
        cfg = OmegaConf.merge(_load_yaml(path.parent / base), cfg)
    cfg = apply_overrides(cfg, overrides or [])
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    resolved = validate(plain)
    if not resolved["run"]["dir"]:  # runs/<project>/<config stem>
        parts = path.resolve().parts
        project = parts[len(parts) - 1 - parts[::-1].index("projects") + 1] if "projects" in parts[:-1] \
            else path.parent.name
        resolved["run"]["dir"] = str(Path("runs") / project / path.stem)
    return resolved


def _load_yaml(path: Path) -> DictConfig:
    """A YAML mapping; a syntax error is one line naming the file, line and column."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        m = e.problem_mark
        where = f"{path}:{m.line + 1}:{m.column + 1}" if m is not None else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {e.problem or e.context}") from None
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"{path}: cannot read the config: {str(e).splitlines()[0]}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{path}: a config is a mapping of sections, not a {type(cfg).__name__}")
    return cfg


def to_yaml(cfg: dict) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def instantiate(section: dict, **extra):
    kwargs = {k: v for k, v in section.items() if k != "target"}
    return locate(section["target"])(**kwargs, **extra)
