"""One strict config mechanism (omegaconf): load YAML, apply ``key=value`` overrides, validate.

A run config has these sections:

``module`` / ``data``   ``target: dotted.path.Class`` plus the keyword arguments of its ``__init__``;
                        keys and types are checked against the signature, defaults are filled in.
``trainer``             keyword arguments of ``lightning.Trainer``.
``run``                 :class:`RunConfig` (run directory, seed, checkpoints, logging).
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


class ConfigError(ValueError):
    pass


@dataclass
class RunConfig:
    dir: str = ""  # default: runs/<config stem>
    seed: int = 0
    resume: str = "auto"  # "auto": last checkpoint of dir if any; "never"; or a checkpoint path
    ckpt_every_n_steps: int = 500
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


SECTIONS = ("module", "data", "trainer", "run", "slurm")


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
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def _check_kwargs(section: str, values: dict, params: dict, owner: str) -> dict:
    out = {}
    for k, v in values.items():
        if k not in params:
            raise ConfigError(f"unknown config key '{section}.{k}' ({owner} accepts: {', '.join(sorted(params))})")
        ann = params[k][0]
        v = _yaml11_float(v, ann)
        if not _type_ok(v, ann):
            raise ConfigError(f"config key '{section}.{k}' has type {type(v).__name__}, "
                              f"expected {_type_name(ann)} (got {v!r})")
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


def _check_dataclass(name: str, sec: dict, cls) -> dict:
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


def validate(cfg: dict) -> dict:
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; expected {list(SECTIONS)}")
    for required in ("module", "data"):
        if required not in cfg:
            raise ConfigError(f"config needs a '{required}' section")
    out = {
        "module": _check_target_section("module", dict(cfg["module"])),
        "data": _check_target_section("data", dict(cfg["data"])),
        "run": _check_dataclass("run", dict(cfg.get("run") or {}), RunConfig),
        "slurm": _check_dataclass("slurm", dict(cfg.get("slurm") or {}), SlurmConfig),
    }
    tp = _trainer_params()
    trainer = dict(cfg.get("trainer") or {})
    for k, v in trainer.items():
        if k not in tp:
            raise ConfigError(f"unknown config key 'trainer.{k}' (not an argument of lightning.Trainer "
                              f"or set by the launcher)")
    out["trainer"] = trainer
    return out


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
    cfg = OmegaConf.load(path)
    base = cfg.pop("base", None) if "base" in cfg else None
    if base:  # a thin overlay on another config, relative to this file
        cfg = OmegaConf.merge(OmegaConf.load(path.parent / base), cfg)
    cfg = apply_overrides(cfg, overrides or [])
    resolved = validate(OmegaConf.to_container(cfg, resolve=True))
    if not resolved["run"]["dir"]:  # runs/<project>/<config stem>
        parts = path.resolve().parts
        project = parts[len(parts) - 1 - parts[::-1].index("projects") + 1] if "projects" in parts[:-1] \
            else path.parent.name
        resolved["run"]["dir"] = str(Path("runs") / project / path.stem)
    return resolved


def to_yaml(cfg: dict) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(cfg))


def instantiate(section: dict, **extra):
    kwargs = {k: v for k, v in section.items() if k != "target"}
    return locate(section["target"])(**kwargs, **extra)
