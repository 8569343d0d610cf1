"""The metric network of the embedded benchmark: a small CNN digit classifier.

Its penultimate activations (``features``, 128-d after ReLU) define the Frechet distance and
precision / recall; its predictions give class accuracy. Trained by projects/classifier on the
training split only and shipped as common/metrics/weights/mnist_classifier.pt.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DigitClassifier(nn.Module):
    def __init__(self, in_channels: int = 1, width: int = 32, feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        w = width

        def conv(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.body = nn.Sequential(conv(in_channels, w), conv(w, w), nn.MaxPool2d(2),  # 16
                                  conv(w, 2 * w), conv(2 * w, 2 * w), nn.MaxPool2d(2),  # 8
                                  conv(2 * w, 4 * w), nn.MaxPool2d(2))  # 4
        self.fc = nn.Linear(4 * w * 16, feature_dim)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim, self.num_classes = feature_dim, num_classes

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features of images in [-1, 1], shape (B, feature_dim)."""
        return F.relu(self.fc(self.body(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(self.features(x)))


def random_affine(x: Tensor, generator: torch.Generator, max_shift: float = 2.0, max_rot: float = 10.0,
                  max_scale: float = 0.1) -> Tensor:
    """Small random shifts (pixels), rotations (degrees) and scalings, background stays at -1."""
    b, _, h, w = x.shape
    ang = (torch.rand(b, generator=generator) * 2 - 1) * max_rot * torch.pi / 180
    sc = 1 + (torch.rand(b, generator=generator) * 2 - 1) * max_scale
    sh = (torch.rand(b, 2, generator=generator) * 2 - 1) * max_shift * 2 / torch.tensor([w, h])
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, sh[:, 0]], 1), torch.stack([sin, cos, sh[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1
