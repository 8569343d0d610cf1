"""Random streams keyed by integers (seed, iteration, purpose, global sample position), never by
rank or worker: a resumed run and a run on any number of processes draw the same numbers."""
from __future__ import annotations

from enum import IntEnum

import torch


_GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1
_SEED_MASK = (1 << 63) - 1


def _mix(x: int) -> int:
    """splitmix64's finaliser on an unsigned 64-bit integer."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >> 63 else x


def _mix_tensor(x: torch.Tensor) -> torch.Tensor:
    """:func:`_mix` on int64 tensors: the same bits (wrapping products, logical shifts by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _signed(0xBF58476D1CE4E5B9)
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _signed(0x94D049BB133111EB)
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def _prefix(keys) -> int:
    h = 0
    for k in keys:
        h = _mix((h + int(k) * _GOLDEN) & _M64)
    return h


def keyed_seed(*keys: int) -> int:
    """A 63-bit seed from a tuple of integers (negative ones included), mixed key by key."""
    return _prefix(keys) & _SEED_MASK


def keyed_seeds(*keys: int, positions: torch.Tensor) -> torch.Tensor:
    """``keyed_seed(*keys, p)`` for every ``p`` of ``positions`` at once (int64)."""
    h = torch.tensor(_signed(_prefix(keys)), dtype=torch.int64)
    return _mix_tensor(h + positions.to(torch.int64) * _signed(_GOLDEN)) & _SEED_MASK


def keyed_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(keyed_seed(*keys))


def _per_sample_fill(out: torch.Tensor, keys, positions, fill: str) -> torch.Tensor:
    g = torch.Generator()
    for row, s in zip(out, keyed_seeds(*keys, positions=positions).tolist()):
        g.manual_seed(s)
        getattr(row, fill)(generator=g)
    return out


def randn_per_sample(keys, positions: torch.Tensor, shape=(), dtype=torch.float32) -> torch.Tensor:
    """Standard normal ``(B, *shape)``: row ``i`` from the generator keyed by ``(*keys, positions[i])``."""
    return _per_sample_fill(torch.empty((len(positions), *shape), dtype=dtype), keys, positions, "normal_")


def rand_per_sample(keys, positions: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Uniform on [0, 1), ``(B,)``: entry ``i`` from the generator keyed by ``(*keys, positions[i])``."""
    return _per_sample_fill(torch.empty((len(positions), 1), dtype=dtype), keys, positions, "uniform_")[:, 0]


def per_sample(positions, *keys: int) -> list[torch.Generator]:
    """One generator per sample, keyed by ``keys`` and the sample's global position."""
    return [keyed_generator(*keys, int(p)) for p in positions]


# keys of the data streams, negative so they never equal an iteration of the module's draws
DATA_ORDER = -1  # (seed, DATA_ORDER, epoch): the epoch permutation of a data set
DATA_LABELS = -2  # (seed, DATA_LABELS, position): the label of a label-only stream
SAMPLING_RENOISE = -3  # (seed, SAMPLING_RENOISE, step, sample index): a few-step sampler's re-noising


class Purpose(IntEnum):
    """What a keyed draw is for; with the role in the key (common.roles.StepContext), the same purpose
    in two roles gives two independent streams."""

    LATENT = 1  # a generator's input noise z
    TIME = 2  # a diffusion time or noise level
    NOISE = 3  # the noise that takes a sample to that time
    DROP = 4  # label dropout
    EXTRA = 5  # a method's further draws (offset by 1, 2, ... for more)
