"""Recipe of the shipped metric classifier (common/metrics/classifier.py): cross-entropy with
small random affine augmentations, on the training split only."""
from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from common.metrics.classifier import DigitClassifier, random_affine
from common.teachers.embedded import save_weights


class ClassifierRecipe(L.LightningModule):
    def __init__(self, net: dict, lr: float = 2e-3, weight_decay: float = 5e-4, augment: bool = True, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.net_spec = {"target": "common.metrics.classifier.DigitClassifier", **{k: v for k, v in net.items()
                                                                                    if k != "target"}}
        self.net = DigitClassifier(**{k: v for k, v in net.items() if k != "target"})
        self.batches_seen = 0
        self.val_acc = None

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        if self.hparams.augment:
            g = torch.Generator().manual_seed(self.hparams.seed * 100003 + self.batches_seen)
            x = random_affine(x, g)
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(1) == y).float().mean())
        self.batches_seen += 1
        return loss

    def on_validation_epoch_start(self):
        self._correct = self._total = 0

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self._correct += int((self.net(x).argmax(1) == y).sum())
        self._total += len(y)

    def on_validation_epoch_end(self):
        self.val_acc = self._correct / max(self._total, 1)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["batches_seen"] = self.batches_seen

    def on_load_checkpoint(self, checkpoint):
        self.batches_seen = checkpoint.get("batches_seen", 0)

    def export(self, path: str) -> None:
        save_weights(path, self.net_spec, self.net.state_dict(),
                     {"recipe": "projects/classifier", "heldout_accuracy": self.val_acc,
                      "batches_seen": self.batches_seen})
