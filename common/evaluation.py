"""Generate under the pinned protocol and measure: the shared core of sample.py, evaluate.py and
benchmark.py."""
from __future__ import annotations

import time

import torch

from common.checkpoints import Generator
from common.metrics import evaluator
from common.sampling import generate
from common.teachers.denoiser import Guided


def guided(gen: Generator, guidance: float | None, mode: str = "standard"):
    """The generator with CFG applied (``guidance=None``: none)."""
    if guidance is None:
        return gen.denoiser
    return Guided(gen.denoiser, guidance, mode)


def default_guidance(gen: Generator) -> float | None:
    """The protocol's CFG scale for conditional teachers; students and unconditional nets: none."""
    if gen.is_teacher and getattr(gen.denoiser, "null_label", None) is not None:
        return evaluator.protocol("mnist")["teacher_guidance"]
    return None


def is_image_model(den) -> bool:
    net = getattr(den, "net", None) or getattr(getattr(den, "denoiser", None), "net", None)
    return getattr(net, "image_size", None) is not None


def draw(gen: Generator, steps: int, guidance: float | None, num_samples: int | None = None, seed: int | None = None,
         mode: str = "standard", sampler: str | None = None, progress: bool = False):
    """Samples and their labels under the protocol (balanced labels, pinned seed)."""
    den = guided(gen, guidance, mode)
    if is_image_model(gen.denoiser):
        p = evaluator.protocol("mnist")
        n = num_samples or p["num_samples"]
        net = gen.denoiser.net
        labels = evaluator.balanced_labels(n, net.num_classes)
        shape = (n, net.in_channels, net.image_size, net.image_size)
    else:
        p = evaluator.protocol("toy2d")
        n = num_samples or p["num_samples"]
        net = gen.denoiser.net
        labels = torch.zeros(n, dtype=torch.long) if net.num_classes else None
        shape = (n, net.in_dim)
    x = generate(den, shape, steps, cond=labels, sampler=sampler or gen.sampler,
                 seed=p["seed"] if seed is None else seed, progress=progress)
    return x, labels


def measure(gen: Generator, steps: int, guidance: float | None, dataset: str = "mnist", **kw) -> dict:
    t0 = time.time()
    x, labels = draw(gen, steps, guidance, **kw)
    seconds = time.time() - t0
    if is_image_model(gen.denoiser):
        out = evaluator.evaluate_images(x, labels)
    else:
        out = evaluator.evaluate_points(x, dataset)
    return {"steps": steps, "guidance": guidance, **out, "sample_seconds": round(seconds, 2)}
