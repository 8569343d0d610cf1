"""The projects of the repository, found by their folders: every ``projects/<name>/project.yaml`` says
its kind (``method``: a distillation project; ``recipe``: trains a network the repo ships), its
default config and, for methods, its benchmark variants and gates. Adding a project touches no file
outside its folder. (Files are read, never imported: common/ does not import projects/.)"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("method", "recipe")
DEFAULT_GATES = {"fd_ratio": 1.5, "accuracy": 0.9, "fit_seconds": 600.0}


@dataclass
class Benchmark:
    variants: dict = field(default_factory=lambda: {"default": []})  # name -> overrides; the first: the default
    gated: list = field(default_factory=lambda: ["default"])
    training_seeds: list = field(default_factory=lambda: [0])  # the default runs at each, other variants at the first
    gated_training_seeds: list = field(default_factory=lambda: [0])
    gates: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)  # variant -> README picture name (default: samples_<variant>.png)
    claims: dict = field(default_factory=dict)  # settings of a project's claim suites (launchers/benchmark.py)


@dataclass
class Project:
    name: str
    kind: str
    dir: Path
    config: Path
    benchmark: Benchmark | None

    def configs(self) -> list[Path]:
        """The embedded default and every paper-scale config under ``configs/``."""
        return [self.config, *sorted((self.dir / "configs").glob("*.yaml"))]

    def grid_name(self, variant: str) -> str:
        return self.benchmark.grids.get(variant, f"samples_{variant}.png")


def load_project(folder: Path) -> Project:
    spec = OmegaConf.to_container(OmegaConf.load(folder / "project.yaml"))
    unknown = set(spec) - {"kind", "config", "benchmark"}
    if unknown:
        raise ValueError(f"{folder / 'project.yaml'}: unknown key(s) {sorted(unknown)}")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{folder / 'project.yaml'}: kind must be one of {KINDS}, got {kind!r}")
    bench = None
    if kind == "method":
        b = spec.get("benchmark") or {}
        names = {f for f in Benchmark.__dataclass_fields__}
        if set(b) - names:
            raise ValueError(f"{folder / 'project.yaml'}: unknown benchmark key(s) {sorted(set(b) - names)}")
        bench = Benchmark(**b)
        bench.gates = {**DEFAULT_GATES, **bench.gates}
        missing = sorted(set(bench.gated) - set(bench.variants))
        if missing:
            raise ValueError(f"{folder / 'project.yaml'}: gated variant(s) {missing} are not among the variants")
    return Project(folder.name, kind, folder, folder / spec.get("config", "config.yaml"), bench)


def projects(kind: str | None = None, root: Path = ROOT) -> dict[str, Project]:
    found = {}
    for f in sorted((root / "projects").glob("*/project.yaml")):
        p = load_project(f.parent)
        if kind is None or p.kind == kind:
            found[p.name] = p
    return found
