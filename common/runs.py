"""Run directories that never lose, mix or misread work.

* A fresh start (``run.resume=never``, or ``auto`` with no checkpoint) into a directory that holds a
  run is refused unless ``run.overwrite=true``, which moves the old run aside to
  ``<dir>.previous-<n>`` (never deletes it).
* Resuming picks the newest *readable* checkpoint of the run's own directory (by the iteration it
  records, not by file times, so a copied directory resumes where it was); an unreadable newer one is
  named and skipped.
* Resuming checks the new config against the one recorded in the checkpoint: another target, role set
  or teacher is always refused; a change outside :data:`RESUMABLE` is refused unless
  ``run.resume_changes=allow``. Any change keeps the previous config as
  ``config.until-it<iteration>.yaml`` beside the new ``config.yaml``.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from common.config import ConfigError, to_yaml
from common.serialization import CheckpointError, read

log = logging.getLogger(__name__)

# what a run writes; any of them means the directory holds a run
RUN_FILES = ("config.yaml", "metrics.csv", "results.json", "checkpoints", "samples")
# settings that may change when a run resumes (its length, bookkeeping, logging, measurement, resources)
RESUMABLE = ("run.iterations", "run.dir", "run.resume", "run.resume_changes", "run.overwrite", "run.wandb",
             "run.notes", "run.export", "run.ckpt_every", "trainer.log_every_n_steps",
             "trainer.enable_progress_bar", "trainer.val_check_interval", "validation.", "slurm.")


def is_rank_zero() -> bool:
    """Before any process group exists: whether this process is the job's first (srun, torchrun and
    Lightning's own launcher set these variables for the others)."""
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def holds_run(run_dir: Path) -> list[str]:
    """The run files in ``run_dir`` (empty: no run there)."""
    found = [n for n in RUN_FILES if (run_dir / n).exists()]
    return found + sorted(p.name for p in run_dir.glob("hpc_ckpt_*.ckpt"))


def move_aside(run_dir: Path) -> Path:
    n = 1
    while (dest := run_dir.with_name(f"{run_dir.name}.previous-{n}")).exists():
        n += 1
    shutil.move(str(run_dir), str(dest))
    return dest


def checkpoint_files(run_dir: Path) -> list[Path]:
    return sorted([*(run_dir / "checkpoints").glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")])


def progress_of(ckpt: dict) -> tuple[int, int]:
    """(iteration, optimizer steps) a checkpoint records; recipes count iterations as steps."""
    step = int(ckpt.get("global_step", 0))
    return int(ckpt.get("distill", {}).get("iteration", step)), step


def newest_readable(run_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint of ``run_dir`` that records the most progress among those that load; unreadable
    ones are warned about (naming the one taken instead). Every candidate unreadable: an error."""
    found, bad = [], []
    for p in checkpoint_files(run_dir):
        try:
            ck = read(p, mmap=True)
        except CheckpointError as e:
            bad.append((p, str(e)))
            continue
        found.append((progress_of(ck), p.name == "last.ckpt", p, ck))
    if not found:
        if bad:
            raise CheckpointError(f"no readable checkpoint in {run_dir}: " + "; ".join(m for _, m in bad))
        return None
    _, _, path, ck = max(found, key=lambda t: t[:2])
    for p, msg in bad:
        print(f"warning: skipping an unreadable checkpoint ({msg}); resuming from {path} instead", flush=True)
    return path, ck


def flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k, "<unset>"), b.get(k, "<unset>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _resumable(key: str) -> bool:
    return any(key == r or (r.endswith(".") and key.startswith(r)) for r in RESUMABLE)


def refused(changes: dict[str, tuple]) -> dict[str, tuple]:
    """The changes (of :func:`config_changes`) a resume does not allow without ``run.resume_changes``."""
    return {k: v for k, v in changes.items() if not _resumable(k)}


def _recorded_config(run_dir: Path) -> dict | None:
    """The run's ``config.yaml`` as a plain dict, if it has one."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


def check_resume(cfg: dict, ckpt_path: Path, ckpt: dict, module) -> dict[str, tuple]:
    """Refuse a checkpoint of another target, role set or teacher, and (unless
    ``run.resume_changes=allow``) any config change outside :data:`RESUMABLE`; return the changes."""
    run_dir = Path(cfg["run"]["dir"])
    old = ckpt.get("run_config")
    if old is None:  # checkpoints written before the record
        old = _recorded_config(run_dir)
    if old is None:
        raise ConfigError(f"cannot resume from {ckpt_path}: it records no run config and {run_dir} has no "
                          f"config.yaml, so what wrote it is unknown")
    was, now = old.get("module", {}).get("target"), cfg["module"]["target"]
    if was != now:
        raise ConfigError(f"cannot resume {now} from {ckpt_path}: that checkpoint was written by {was}")
    mine = set(getattr(module, "roles", {}) or {})
    theirs = set(ckpt.get("distill", {}).get("roles", {})) if "distill" in ckpt else mine
    if mine != theirs:
        raise ConfigError(f"cannot resume from {ckpt_path}: it has the roles {sorted(theirs)}, this config "
                          f"the roles {sorted(mine)}")
    if hasattr(module, "check_frozen_sources"):
        try:
            module.check_frozen_sources(ckpt)
        except ValueError as e:
            raise ConfigError(f"cannot resume from {ckpt_path}: {e}") from None
    changes = config_changes(old, cfg)
    not_allowed = refused(changes)
    if not_allowed and cfg["run"]["resume_changes"] != "allow":
        lines = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in not_allowed.items())
        raise ConfigError(f"resuming {ckpt_path} with a changed config: {lines}. Resume with the recorded "
                          f"config, start elsewhere (run.dir=...), or set run.resume_changes=allow to apply "
                          f"the change from here on (both configs are kept)")
    return changes


def record_config(cfg: dict, changes: dict | None, iteration: int) -> None:
    """Write ``config.yaml``; on a resume with changes, keep the previous one beside it first."""
    run_dir = Path(cfg["run"]["dir"])
    path = run_dir / "config.yaml"
    if changes and path.is_file():
        n, keep = 0, run_dir / f"config.until-it{iteration:07d}.yaml"
        while keep.exists():
            n += 1
            keep = run_dir / f"config.until-it{iteration:07d}.{n}.yaml"
        path.replace(keep)
        for k, (a, b) in changes.items():
            print(f"resume: {k}: {a!r} -> {b!r}", flush=True)
        print(f"resume: the previous config is kept as {keep}", flush=True)
    tmp = path.with_name("config.yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


def _same_run_without_checkpoint(cfg: dict, run_dir: Path, existing: list[str]) -> bool:
    """A run of this very config that stopped before writing any checkpoint or final figures: starting
    it again rewrites what it had logged with the same values, so nothing is lost."""
    if set(existing) - {"config.yaml", "metrics.csv", "samples", "checkpoints"} or checkpoint_files(run_dir):
        return False
    old = _recorded_config(run_dir)
    return old is not None and not refused(config_changes(old, cfg))


def prepare(cfg: dict) -> tuple[Path | None, dict | None]:
    """Decide how a fit starts in ``run.dir``: (checkpoint path, its content) to resume from, or
    (None, None) for a fresh start (after moving an old run aside when ``run.overwrite`` says so)."""
    run_dir = Path(cfg["run"]["dir"])
    resume = cfg["run"]["resume"]
    if resume not in ("auto", "never"):
        p = Path(resume)
        if not p.is_file():
            raise ConfigError(f"run.resume: checkpoint not found: {resume}")
        return p, read(p, mmap=True)
    found = newest_readable(run_dir) if resume == "auto" and run_dir.is_dir() else None
    if found:
        return found
    if not is_rank_zero():  # other ranks start with rank 0, after it has checked (and may have written) run.dir
        return None, None
    existing = holds_run(run_dir) if run_dir.is_dir() else []
    if existing and resume == "auto" and _same_run_without_checkpoint(cfg, run_dir, existing):
        print(f"run.dir {run_dir} holds this run, stopped before its first checkpoint: starting it again",
              flush=True)
        return None, None
    if existing:
        if not cfg["run"]["overwrite"]:
            why = "run.resume=never" if resume == "never" else "it has no checkpoint to resume from"
            raise ConfigError(f"run.dir {run_dir} already holds a run ({', '.join(existing)}) and {why}; "
                              f"resume it (run.resume=auto), choose another run.dir, or set run.overwrite=true "
                              f"to move it aside")
        dest = move_aside(run_dir)
        print(f"run.overwrite: moved the previous run in {run_dir} to {dest}", flush=True)
    return None, None
