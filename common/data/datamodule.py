"""Data order as a pure function of (seed, global sample position).

Position ``p`` of the infinite training stream is sample ``perm_e[p % N]`` of epoch ``e = p // N``,
where ``perm_e`` is a permutation drawn from ``seed`` and ``e``. Global batch ``j`` holds positions
``[j B, (j + 1) B)``; rank ``r`` of ``W`` takes the ``r``-th contiguous slice of ``B / W``. So a run
on any number of ranks and workers sees the same global batches, and a resumed run continues at
batch ``batches_seen`` (read from the LightningModule, restored from its checkpoint).
Each batch also carries the global positions, for noise keyed by sample index.
"""
from __future__ import annotations

import logging

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from common.data import embedded
from common.data.embedded import DatasetName, Split
from common.rng import DATA_ORDER, keyed_generator

log = logging.getLogger(__name__)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=keyed_generator(seed, DATA_ORDER, epoch))


class PositionDataset(Dataset):
    """Maps a global stream position to ``(x, label, position)`` through the epoch permutation."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor, seed: int, shuffle: bool = True):
        self.x, self.labels, self.seed, self.shuffle = x, labels, seed, shuffle
        self._perm_epoch, self._perm = -1, None

    def __len__(self):
        return len(self.x)

    def index(self, pos: int) -> int:
        n = len(self.x)
        if not self.shuffle:
            return pos % n
        e = pos // n
        if e != self._perm_epoch:
            self._perm_epoch, self._perm = e, epoch_permutation(n, self.seed, e)
        return int(self._perm[pos % n])

    def __getitem__(self, pos: int):
        i = self.index(pos)
        return self.x[i], self.labels[i], pos


class StreamBatchSampler(Sampler):
    """Yields this rank's slice of global batches ``start_batch, start_batch + 1, ...`` (endless)."""

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, start_batch: int = 0,
                 num_batches: int | None = None):
        self.b, self.rank, self.world, self.start, self.num = batch_size, rank, world_size, start_batch, num_batches

    def __iter__(self):
        j = self.start
        B = self.b * self.world
        while self.num is None or j < self.start + self.num:
            base = j * B + self.rank * self.b
            yield list(range(base, base + self.b))
            j += 1

    def __len__(self):
        if self.num is None:
            raise TypeError("endless sampler has no length")
        return self.num


class EmbeddedDataModule(L.LightningDataModule):
    """An embedded set (``mnist``, ``8gaussians``, ``checkerboard``) as an endless, resumable stream.

    ``batch_size`` is the global batch; it must divide by the world size.
    """

    def __init__(self, name: DatasetName = "mnist", batch_size: int = 64, num_workers: int = 0, seed: int = 0,
                 split: Split = "train", val_split: Split | None = None, root: str | None = None):
        super().__init__()
        self.name, self.batch_size, self.num_workers = name, batch_size, num_workers
        self.seed, self.split, self.val_split, self.root = seed, split, val_split, root

    def setup(self, stage=None):
        x, y = embedded.load_tensors(self.name, self.split, self.root)
        self.dataset = PositionDataset(x, y, self.seed)

    def _world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self):
        rank, world = self._world()
        if self.batch_size % world:
            raise ValueError(f"data.batch_size={self.batch_size} (global) is not divisible by world size {world}")
        module = self.trainer.lightning_module if self.trainer is not None else None
        start = int(getattr(module, "batches_seen", 0))
        if start:
            log.info("data stream resumes at global batch %d", start)
        sampler = StreamBatchSampler(self.batch_size // world, rank, world, start_batch=start)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self):
        if self.val_split:  # a real split, in order (e.g. the classifier's held-out accuracy)
            x, y = embedded.load_tensors(self.name, self.val_split, self.root)
            return DataLoader(PositionDataset(x, y, self.seed, shuffle=False), batch_size=500)
        # generative models sample in their validation hook: one dummy batch triggers it
        return DataLoader([0], batch_size=1)


class ShardDataModule(EmbeddedDataModule):
    """Image shards on local disk (``<dir>/<prefix>-*.tar`` with ``png`` images and ``cls`` labels, e.g.
    CIFAR-10 written by ``data/build_image_shards.py``), read into memory: the same resumable,
    rank-independent stream as the embedded sets. Fine up to a few GB (CIFAR-10: 150 MB)."""

    def __init__(self, shards: str, prefix: str = "train", batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0):
        super().__init__("mnist", batch_size, num_workers, seed)
        self.shards, self.prefix = shards, prefix

    def setup(self, stage=None):
        from common.data.shards import read_shards, shard_paths

        arrays, _ = read_shards(shard_paths(self.shards, self.prefix), {"image": "png", "label": "cls"})
        img = arrays["image"]
        img = img[..., None] if img.ndim == 3 else img  # grey (N, H, W) -> (N, H, W, 1)
        x = torch.from_numpy(img.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2).contiguous()
        self.dataset = PositionDataset(x, torch.from_numpy(arrays["label"].astype(np.int64)), self.seed)


class LatentShardDataModule(ShardDataModule):
    """Precomputed latents and their text embeddings on local disk: shards ``<dir>/<prefix>-*.tar`` whose
    samples are ``<key>.latent.npy`` (an image ``(C, H, W)`` or video ``(C, T, H, W)`` latent, already
    scaled as the teacher expects) and ``<key>.text.npy`` (the prompt's embedding ``(L, D)``), read
    into memory: batches ``(latent, embedding, position)`` in the same resumable stream. For what fits
    in memory; larger sets need a streaming reader."""

    def setup(self, stage=None):
        from common.data.shards import read_shards, shard_paths

        arrays, _ = read_shards(shard_paths(self.shards, self.prefix), {"latent": "latent.npy", "text": "text.npy"})
        self.dataset = PositionDataset(torch.from_numpy(arrays["latent"].astype(np.float32)),
                                       torch.from_numpy(arrays["text"].astype(np.float32)), self.seed)
