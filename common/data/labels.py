"""A data-free stream for image-free methods (SwiftBrush, SiD): only class labels, never images.

Each global position draws its label from a generator keyed by (seed, position), so the stream
has the same properties as common/data/datamodule.py (rank split, resume); batches are
``(labels, positions)``.
"""
from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from common.data.datamodule import StreamBatchSampler


class LabelDataset(Dataset):
    def __init__(self, num_classes: int, seed: int):
        self.num_classes, self.seed = num_classes, seed

    def __len__(self):
        return 1 << 62

    def __getitem__(self, pos: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + pos)
        return torch.randint(self.num_classes, (), generator=g), pos


class LabelDataModule(L.LightningDataModule):
    def __init__(self, num_classes: int = 10, batch_size: int = 64, seed: int = 0, num_workers: int = 0):
        super().__init__()
        self.num_classes, self.batch_size, self.seed, self.num_workers = num_classes, batch_size, seed, num_workers

    def train_dataloader(self):
        t = self.trainer
        rank, world = (t.global_rank, t.world_size) if t is not None else (0, 1)
        if self.batch_size % world:
            raise ValueError(f"data.batch_size={self.batch_size} (global) is not divisible by world size {world}")
        start = int(getattr(t.lightning_module, "batches_seen", 0)) if t is not None else 0
        return DataLoader(LabelDataset(self.num_classes, self.seed),
                          batch_sampler=StreamBatchSampler(self.batch_size // world, rank, world, start_batch=start),
                          num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader([0], batch_size=1)
