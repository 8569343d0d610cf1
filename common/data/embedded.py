"""Embedded datasets: built from package data into a cache folder on first use, never downloaded.

The cache folder is ``$FEWSTEP_CACHE`` or ``~/.cache/fewstep``. A build writes into a temporary
folder and renames it into place, so concurrent first uses (several tests, DDP ranks) and a
build killed half-way never leave a partial set behind.
"""
from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from typing import Literal, get_args

import numpy as np
import torch

from common.data.shards import NoReadableData, read_shards, shard_paths

log = logging.getLogger(__name__)

BUILDERS = {"mnist": "data.build_mnist", "toy2d": "data.build_toy2d"}
LABEL_CLASSES = {"mnist": 10}  # labels outside [0, classes) are corrupt samples
SETS = {  # dataset name -> (builder folder, shard prefix, fields)
    "mnist": ("mnist", "mnist", {"image": "png", "label": "cls"}),
    "8gaussians": ("toy2d", "8gaussians", {"x": "npy", "label": "cls"}),
    "checkerboard": ("toy2d", "checkerboard", {"x": "npy", "label": "cls"}),
}
DatasetName = Literal["mnist", "8gaussians", "checkerboard"]  # the keys of SETS
Split = Literal["train", "heldout"]
SPLITS = get_args(Split)


assert set(get_args(DatasetName)) == set(SETS)


def cache_root() -> Path:
    value = os.environ.get("FEWSTEP_CACHE")
    if value is not None and not value.strip():
        raise ValueError("FEWSTEP_CACHE is set but empty; unset it (default ~/.cache/fewstep) or name a folder")
    return Path(value) if value else Path.home() / ".cache" / "fewstep"


def ensure_built(folder: str) -> Path:
    """The shard folder of an embedded builder, built now if missing."""
    dest = cache_root() / folder
    if dest.is_dir() and any(dest.glob("*.tar")):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder}-", dir=dest.parent))
    try:
        importlib.import_module(BUILDERS[folder]).build(str(tmp))
        try:
            os.replace(tmp, dest)
        except OSError:  # another process won the race and dest exists now
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def paths(name: str, split: str, root: str | None = None) -> list[str]:
    if name not in SETS:
        raise ValueError(f"unknown embedded dataset {name!r}; expected one of {sorted(SETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    folder, prefix, _ = SETS[name]
    directory = Path(root) if root else ensure_built(folder)
    return shard_paths(directory, f"{prefix}-{split}")


def _checks(name: str) -> dict:
    n = LABEL_CLASSES.get(name)
    return {"label": lambda v: None if 0 <= v < n else f"label {v} is outside the {n} classes"} if n else {}


@lru_cache(maxsize=16)
def _load(name: str, split: str, root: str | None) -> tuple[dict, dict]:
    fields = SETS[name][2]
    if root:  # the user's own copy: corrupt samples are skipped and counted, nothing is rebuilt
        return read_shards(paths(name, split, root), fields, _checks(name))
    try:
        arrays, stats = read_shards(paths(name, split), fields, _checks(name))
        if not (stats["corrupt_samples"] or stats["corrupt_shards"]):
            return arrays, stats
        why = f"{stats['corrupt_samples']} corrupt sample(s), {stats['corrupt_shards']} corrupt shard(s)"
    except (NoReadableData, FileNotFoundError) as e:
        why = str(e)
    # the embedded cache is built from data inside the repo, so a damaged one is rebuilt, never used
    folder = cache_root() / SETS[name][0]
    broken = folder.with_name(folder.name + ".broken")
    shutil.rmtree(broken, ignore_errors=True)
    if folder.exists():
        os.replace(folder, broken)
    log.warning("embedded data cache %s is damaged (%s); moved it to %s and rebuilding it", folder, why, broken)
    return read_shards(paths(name, split), fields, _checks(name))


def load_tensors(name: str, split: str, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, label)`` of an embedded set: images as float in [-1, 1] of shape (N, 1, 32, 32),
    toy points as float (N, 2)."""
    arrays, _ = _load(name, split, root)
    if name == "mnist":
        x = torch.from_numpy(arrays["image"].astype(np.float32) / 127.5 - 1).unsqueeze(1)
    else:
        x = torch.from_numpy(arrays["x"].astype(np.float32))
    return x, torch.from_numpy(arrays["label"].astype(np.int64))
