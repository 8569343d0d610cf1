"""Read every checkpoint and weights file the same safe way.

``torch.load(..., weights_only=True)`` unpickles tensors and plain containers (dict, list, tuple, str,
numbers) only, so a file from someone else cannot run code when it is read. Nothing in this
codebase loads with ``weights_only=False``: a file that needs it is refused, never retried.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message names the file."""


def read(path, mmap: bool = False) -> dict:
    """The content of a checkpoint file, loaded with ``weights_only=True``; a short
    :class:`CheckpointError` naming the file when it is missing, truncated, not a checkpoint, or holds
    anything but tensors and plain types."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut or foreign file is none
        raise CheckpointError(f"{path}: not a readable checkpoint (no torch zip archive: truncated, corrupt "
                              f"or another format)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        why = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise CheckpointError(f"{path}: refused, it holds objects other than tensors and plain types "
                              f"(a pickled class or callable could run code when loaded){': ' + why if why else ''}"
                              ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        msg = str(e).strip().split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt or truncated: {msg})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (it holds a {type(obj).__name__}, not a dict)")
    return obj
