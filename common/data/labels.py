"""A data-free stream for image-free methods (SwiftBrush, SiD): only class labels, never images.

Each global position draws its label from a generator keyed by (seed, position) (common/rng.py), so the stream
has the same properties as common/data/datamodule.py (rank split, resume); batches are
``(labels, positions)``.
"""
from __future__ import annotations

import os

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from common.data.datamodule import PositionDataset, StreamBatchSampler
from common.rng import DATA_LABELS, keyed_generator


class LabelDataset(Dataset):
    def __init__(self, num_classes: int, seed: int):
        self.num_classes, self.seed = num_classes, seed

    def __len__(self):
        return 1 << 62

    def __getitem__(self, pos: int):
        g = keyed_generator(self.seed, DATA_LABELS, pos)
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
        return DataLoader(self._dataset(),
                          batch_sampler=StreamBatchSampler(self.batch_size // world, rank, world, start_batch=start),
                          num_workers=self.num_workers)

    def _dataset(self):
        return LabelDataset(self.num_classes, self.seed)

    def val_dataloader(self):
        return DataLoader([0], batch_size=1)


class PromptDataset(PositionDataset):
    """Precomputed prompt embeddings, one per global position through the same epoch permutation as
    the image sets; items are ``(embedding, position)``."""

    def __init__(self, embeddings: torch.Tensor, seed: int):
        super().__init__(embeddings, None, seed)

    def __getitem__(self, pos: int):
        return self.x[self.index(pos)].float(), pos


def load_prompt_file(path: str) -> dict:
    """An ``.npz`` of text embeddings written by ``data/build_prompt_embeddings.py``: ``embeddings``
    (N, L, D) and ``null`` (L, D), the empty prompt's embedding."""
    import numpy as np

    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt embeddings not found: {path}")
    with np.load(path) as f:
        missing = {"embeddings", "null"} - set(f.files)
        if missing:
            raise KeyError(f"{path}: missing array(s) {sorted(missing)}")
        emb, null = torch.from_numpy(f["embeddings"]), torch.from_numpy(f["null"])
    if emb.ndim != 3 or null.shape != emb.shape[1:]:
        raise ValueError(f"{path}: embeddings {tuple(emb.shape)} and null {tuple(null.shape)} do not match "
                         f"(expected (N, L, D) and (L, D))")
    return {"embeddings": emb, "null": null}


class PromptDataModule(LabelDataModule):
    """Prompts only, never images (SwiftBrush at paper scale): batches are ``(embeddings, positions)``."""

    def __init__(self, embeddings: str, batch_size: int = 16, seed: int = 0, num_workers: int = 0):
        super().__init__(1, batch_size, seed, num_workers)
        self.path = embeddings

    def _dataset(self):
        return PromptDataset(load_prompt_file(self.path)["embeddings"], self.seed)
