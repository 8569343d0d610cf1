"""Load something that generates samples: an embedded teacher, a weights file, or a run checkpoint.

``spec`` is one of
  ``teacher:<name>``                    an embedded teacher (``teacher:mnist``);
  ``path/to/weights.pt``                a weights file written by a recipe's ``export``;
  ``path/to/run/checkpoints/x.ckpt``    a Lightning checkpoint of a run; the run's ``config.yaml``
                                        (two folders up) builds the module, the checkpoint loads
                                        strictly (frozen teachers are checked by hash instead), and
                                        ``generator_denoiser()`` and ``sampler`` say how to sample;
                                        ``raw=True`` samples the student's raw weights instead of
                                        its EMA (spec pitfalls: "evaluate EMA and raw weights");
                                        ``overrides`` (``module.key=value``) change how the
                                        checkpoint's module samples (``module.guidance_sample=1.25``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from common.serialization import CheckpointError, read
from common.teachers.embedded import load_teacher


@dataclass
class Generator:
    denoiser: torch.nn.Module
    sampler: str  # a key of common.sampling.SAMPLERS
    source: str
    is_teacher: bool


def load_generator(spec: str, raw: bool = False, overrides: tuple | list = ()) -> Generator:
    if (raw or overrides) and not spec.endswith(".ckpt"):
        raise ValueError(f"raw weights and module overrides are a run checkpoint's (.ckpt), not {spec!r}'s")
    bad = [o for o in overrides if not o.startswith("module.")]
    if bad:
        raise ValueError(f"only module.* keys change how a checkpoint samples, not {bad}")
    if spec.startswith("teacher:"):
        return Generator(load_teacher(spec.split(":", 1)[1]), "euler", spec, True)
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".ckpt":
        cfg_file = path.parent.parent / "config.yaml"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} has no run config at {cfg_file}; cannot tell which module wrote it")
        from omegaconf import OmegaConf

        from common.config import apply_overrides, build_module

        cfg = OmegaConf.to_container(apply_overrides(OmegaConf.load(cfg_file), list(overrides)))
        state = read(path)
        if "state_dict" not in state:
            raise CheckpointError(f"{path}: not a run checkpoint (it has no state_dict)")
        wrote = state.get("run_config", {}).get("module", {}).get("target")
        if wrote and wrote != cfg["module"]["target"]:
            raise CheckpointError(f"{path} was written by {wrote}, but the run config beside it ({cfg_file}) "
                                  f"builds {cfg['module']['target']}")
        try:
            module = build_module(cfg)
        except TypeError as e:
            if not overrides:
                raise
            raise ValueError(f"{overrides}: {e}") from None
        module.check_frozen_sources(state)  # the teacher it was trained with, by hash
        try:
            module.load_state_dict(state["state_dict"])  # strict, apart from frozen roles identified by file
        except RuntimeError as e:
            raise CheckpointError(f"{path}: {str(e).splitlines()[0]}") from None
        if raw:  # the raw student's weights into the EMA copy that generator_denoiser() samples
            if getattr(module, "ema", None) is None:
                raise ValueError(f"{path}: its module has no EMA, so its samples are the raw weights already")
            module.ema.ema_model.load_state_dict(module.roles["student"].net.state_dict())
        den = module.generator_denoiser().eval().requires_grad_(False)
        return Generator(den, getattr(module, "sampler", "euler"), str(path) + (" (raw weights)" if raw else ""),
                         getattr(module, "sampler", "euler") != "multistep")
    return Generator(load_teacher(str(path)), "euler", str(path), True)
