"""Embedded datasets: built from package data into a cache folder on first use, never downloaded.

The cache folder is ``$FEWSTEP_CACHE`` or ``~/.cache/fewstep``. A build writes into a temporary
folder and renames it into place, so concurrent first uses (several tests, DDP ranks) and a
build killed half-way never leave a partial set behind.
"""
from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from common.data.shards import read_shards, shard_paths

BUILDERS = {"mnist": "data.build_mnist", "toy2d": "data.build_toy2d"}
SETS = {  # dataset name -> (builder folder, shard prefix, fields)
    "mnist": ("mnist", "mnist", {"image": "png", "label": "cls"}),
    "8gaussians": ("toy2d", "8gaussians", {"x": "npy", "label": "cls"}),
    "checkerboard": ("toy2d", "checkerboard", {"x": "npy", "label": "cls"}),
}
SPLITS = ("train", "heldout")


def cache_root() -> Path:
    return Path(os.environ.get("FEWSTEP_CACHE", Path.home() / ".cache" / "fewstep"))


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


@lru_cache(maxsize=16)
def _load(name: str, split: str, root: str | None) -> tuple[dict, dict]:
    return read_shards(paths(name, split, root), SETS[name][2])


def load_tensors(name: str, split: str, root: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, label)`` of an embedded set: images as float in [-1, 1] of shape (N, 1, 32, 32),
    toy points as float (N, 2)."""
    arrays, _ = _load(name, split, root)
    if name == "mnist":
        x = torch.from_numpy(arrays["image"].astype(np.float32) / 127.5 - 1).unsqueeze(1)
    else:
        x = torch.from_numpy(arrays["x"].astype(np.float32))
    return x, torch.from_numpy(arrays["label"].astype(np.int64))
