"""Random streams keyed by integers (seed, iteration, purpose, global sample position), never by
rank or worker: a resumed run and a run on any number of processes draw the same numbers."""
from __future__ import annotations

import hashlib

import torch


def keyed_seed(*keys: int) -> int:
    h = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def keyed_generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(keyed_seed(*keys))


def per_sample(positions, *keys: int) -> list[torch.Generator]:
    """One generator per sample, keyed by ``keys`` and the sample's global position."""
    return [keyed_generator(*keys, int(p)) for p in positions]
