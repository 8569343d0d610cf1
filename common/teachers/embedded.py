"""Embedded teachers shipped in the repo (common/teachers/weights), and the net-spec format.

A weights file is ``{"net": {"target": ..., **kwargs}, "state_dict": ..., "meta": {...}}``; the
teacher is a rectified-flow velocity model with time embedding ``1000 s`` and the null class
``num_classes`` for classifier-free guidance.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from common import noise
from common.serialization import read
from common.teachers.denoiser import Denoiser

WEIGHTS_DIR = Path(__file__).parent / "weights"
EMBEDDED = {"mnist": WEIGHTS_DIR / "mnist_dit.pt", "8gaussians": WEIGHTS_DIR / "toy_8gaussians_mlp.pt",
            "checkerboard": WEIGHTS_DIR / "toy_checkerboard_mlp.pt"}
FLOW_TIME_SCALE = 1000.0


def build_net(spec: dict) -> nn.Module:
    from common.config import locate

    kwargs = {k: v for k, v in spec.items() if k != "target"}
    return locate(spec["target"])(**kwargs)


def flow_denoiser(net: nn.Module) -> Denoiser:
    num_classes = getattr(net, "num_classes", 0)
    return Denoiser(net, noise.RectifiedFlow(), "flow", time_scale=FLOW_TIME_SCALE,
                    null_label=num_classes or None)  # the last label row is the null class


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_weights(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = read(path)
    for key in ("net", "state_dict"):
        if key not in ckpt:
            raise ValueError(f"{path} is not a weights file: it has no {key!r} entry")
    return ckpt


def load_teacher(name_or_path: str = "mnist", frozen: bool = True) -> Denoiser:
    """An embedded teacher by name (``mnist``, ``8gaussians``, ``checkerboard``), a weights file path, or
    ``diffusers:<directory or cached hub id>`` (:mod:`common.teachers.hub`)."""
    if name_or_path.startswith("diffusers:"):
        from common.teachers.hub import load_diffusers_teacher

        return load_diffusers_teacher(name_or_path, frozen=frozen)
    path = EMBEDDED.get(name_or_path, Path(name_or_path))
    if not path.is_file() and os.sep not in name_or_path and not path.suffix:
        raise FileNotFoundError(f"no embedded teacher {name_or_path!r} (embedded: {', '.join(EMBEDDED)}) "
                                f"and no weights file of that name")
    ckpt = load_weights(path)
    net = build_net(ckpt["net"])
    net.load_state_dict(ckpt["state_dict"])
    den = flow_denoiser(net).eval()
    if frozen:
        den.requires_grad_(False)
    den.source = {"path": str(path), "sha256": file_sha256(path)}
    den.meta = ckpt.get("meta", {})
    return den


def save_weights(path: str | os.PathLike, net_spec: dict, state_dict: dict, meta: dict | None = None) -> None:
    """Write a weights file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"net": net_spec, "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
                "meta": meta or {}}, tmp)
    os.replace(tmp, path)
