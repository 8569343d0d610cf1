"""Generate under the pinned protocol and measure: the shared core of sample.py, evaluate.py and
benchmark.py."""
from __future__ import annotations

import time

import torch

from common.checkpoints import Generator
from common.metrics import evaluator
from common.sampling import generate
from common.teachers.denoiser import Guided


MIN_SAMPLES = 10  # one per class of the balanced labels, and more than the k of precision / recall


def check_request(steps: list[int] | None, num_samples: int | None, dataset: str | None = None,
                  minimum: int = MIN_SAMPLES) -> str | None:
    """Validate sampling arguments (a ValueError naming the bad one); return a note when the sample
    count differs from the protocol's, whose floor and recorded figures hold only at its own count."""
    for n in steps or []:
        if n < 1:
            raise ValueError(f"--steps must be at least 1, got {n}")
    p = evaluator.protocol_for(dataset or "mnist")  # names the protocols when the data set is unknown
    if num_samples is not None and num_samples < minimum:
        raise ValueError(f"--num-samples must be at least {minimum}, got {num_samples}")
    if num_samples is not None and num_samples != p["num_samples"]:
        return (f"note: {num_samples} samples, not the protocol's {p['num_samples']}: FD and precision/recall "
                f"are biased by the sample count, so these figures are not comparable with the floor or with "
                f"recorded results")
    return None


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
