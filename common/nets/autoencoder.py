"""A small convolutional autoencoder of the embedded digits, whose frozen encoder is the image
backbone of networks that must not be the judge (DESIGN.md, "The judge stays out of training"):
Flash-DMD's pixel discriminator (standing in for SAM), SlimFlow's perceptual distance (standing in
for LPIPS). It is trained by reconstruction alone, never with labels, so its features know strokes
and shapes, not classes.

``python -m common.nets.autoencoder --out <file>`` is its recipe (about 8 minutes on one core);
the shipped weights ``common/nets/weights/mnist_ae.pt`` came from it (their ``meta`` says how).
:func:`load_encoder` gives the frozen encoder with its source (path and sha256) for a role.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.nets.recipe import load_shipped, recipe_main, train_small

WEIGHTS = {"mnist_ae": Path(__file__).parent / "weights" / "mnist_ae.pt"}


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(min(8, cout // 4), cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(min(8, cout // 4), cout), nn.SiLU())


class Encoder(nn.Module):
    """Images ``(B, C, H, W)`` in [-1, 1] to a latent ``(B, latent, H/8, W/8)``; ``stages.<i>`` are the
    feature maps at full, 1/2, 1/4 and 1/8 resolution (``widths``), for hooks."""

    def __init__(self, in_channels: int = 1, widths: tuple = (16, 32, 64, 64), latent: int = 8):
        super().__init__()
        self.widths = list(widths)
        self.stages = nn.ModuleList(_block(cin, cout, 1 if i == 0 else 2)
                                    for i, (cin, cout) in enumerate(zip([in_channels, *widths], widths)))
        self.to_latent = nn.Conv2d(widths[-1], latent, 1)

    def forward(self, x: Tensor, return_features: bool = False):
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        z = self.to_latent(x)
        return (z, feats) if return_features else z


class ConvAutoencoder(nn.Module):
    def __init__(self, in_channels: int = 1, widths: list | tuple = (16, 32, 64, 64), latent: int = 8):
        super().__init__()
        self.encoder = Encoder(in_channels, tuple(widths), latent)
        w = list(widths)[::-1]
        ups = [nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), _block(cin, cout, 1))
               for cin, cout in zip(w, w[1:])]
        self.decoder = nn.Sequential(nn.Conv2d(latent, w[0], 3, 1, 1), nn.SiLU(), *ups,
                                     nn.Conv2d(w[-1], in_channels, 3, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))


def load_encoder(name_or_path: str = "mnist_ae") -> tuple[Encoder, dict]:
    """The frozen encoder of a shipped (``mnist_ae``) or given autoencoder weights file, and its source
    ``{"path", "sha256"}`` (a frozen role identified by file is not stored in checkpoints)."""
    net, source = load_shipped(WEIGHTS, name_or_path, ConvAutoencoder)
    return net.encoder.eval().requires_grad_(False), source


def train(out: str, steps: int = 1500, batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> dict:
    """Reconstruction (MSE) of the 4,000 training digits with random shifts of up to 2 pixels; AdamW
    with a cosine decay; the held-out reconstruction MSE is in the weights' meta."""
    from common.data.embedded import load_tensors

    x, _ = load_tensors("mnist", "train")
    x_val, _ = load_tensors("mnist", "heldout")
    spec = {"target": "common.nets.autoencoder.ConvAutoencoder", "in_channels": 1, "widths": [16, 32, 64, 64],
            "latent": 8}

    def loss(net, g):
        xb = x[torch.randint(len(x), (batch_size,), generator=g)]
        dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=g))
        xb = torch.roll(xb, (dx, dy), (2, 3))
        return F.mse_loss(net(xb), xb)

    def heldout(net):
        mse = sum(F.mse_loss(net(xb), xb, reduction="sum").item() for xb in x_val.split(500)) / x_val.numel()
        return {"heldout_mse": round(mse, 5)}

    return train_small(spec, loss, out, steps=steps, lr=lr, seed=seed, desc="autoencoder", evaluate=heldout,
                       recipe="python -m common.nets.autoencoder", batch_size=batch_size)


if __name__ == "__main__":
    recipe_main(__doc__, str(WEIGHTS["mnist_ae"]), 1500, train)
