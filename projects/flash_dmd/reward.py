"""Flash-DMD's reward network on the embedded benchmark (standing in for the paper's latent reward
model, papers/flash_dmd.md section 3): a small noise-conditioned convolutional network that scores a
noisy image ``x_s`` at flow time ``s``. It is trained to score the real training digits above degraded
copies of them (blurred, speckled, broken strokes, thickened or thinned strokes), both noised at the
same ``s`` with the same noise: a pairwise logistic loss. It never sees a label and is not a class
classifier (DESIGN.md, "The judge stays out of training"): raising it asks for clean strokes and
clean backgrounds, not for a class.

``python -m projects.flash_dmd.reward --out <file>`` is its recipe (about 6 minutes on one core); the
shipped ``projects/flash_dmd/weights/reward.pt`` came from it (its ``meta`` has the held-out pairwise
accuracy). :func:`load_reward` gives the frozen network and its source for a role.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.nets.recipe import load_shipped, recipe_main, train_small

WEIGHTS = {"mnist_reward": Path(__file__).parent / "weights" / "reward.pt"}
DEGRADATIONS = ("blur", "speckle", "broken", "thick", "thin")


def _embed_time(s: Tensor, dim: int) -> Tensor:
    freqs = torch.exp(-math.log(1000.0) * torch.arange(dim // 2, device=s.device) / (dim // 2))
    a = 1000.0 * s.float()[:, None] * freqs[None]
    return torch.cat([a.sin(), a.cos()], 1)


class NoisyReward(nn.Module):
    """``r(x_s, s)``, one score per sample: three stride-2 conv stages with FiLM from the time
    embedding, then a quality score and an attention logit at each position of the last map; the score
    is the attention-weighted mean of the quality, ``sum_p softmax(a)_p q_p``. A mean over positions
    would grow with the amount of stroke (a sum of local evidence: it scored zeros far above ones);
    the weighted mean asks how good the strokes are wherever they are, not how many there are."""

    def __init__(self, in_channels: int = 1, widths: list | tuple = (32, 64, 96), tdim: int = 64):
        super().__init__()
        self.tdim = tdim
        self.time = nn.Sequential(nn.Linear(tdim, 128), nn.SiLU(), nn.Linear(128, 128))
        chans = [in_channels, *widths]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, 2, 1) for a, b in zip(chans, chans[1:]))
        self.convs2 = nn.ModuleList(nn.Conv2d(b, b, 3, 1, 1) for b in widths)
        self.norms = nn.ModuleList(nn.GroupNorm(8, b) for b in widths)
        self.films = nn.ModuleList(nn.Linear(128, 2 * b) for b in widths)
        self.out = nn.Conv2d(widths[-1], 2, 1)  # quality and attention logit per position

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        e = self.time(_embed_time(s.expand(len(x)), self.tdim))
        for conv, conv2, norm, film in zip(self.convs, self.convs2, self.norms, self.films):
            scale, shift = film(e)[:, :, None, None].chunk(2, 1)
            x = F.silu(conv(x))
            x = F.silu(norm(conv2(x)) * (1 + scale) + shift)
        q, a = self.out(x).flatten(2).unbind(1)
        return (q * a.softmax(1)).sum(1)


def degrade(x: Tensor, g: torch.Generator) -> Tensor:
    """Each digit (in [-1, 1]) with one degradation drawn from :data:`DEGRADATIONS`."""
    out = x.clone()
    kind = torch.randint(len(DEGRADATIONS), (len(x),), generator=g)
    for i, name in enumerate(DEGRADATIONS):
        m = kind == i
        if not m.any():
            continue
        xi = x[m]
        if name == "blur":
            sigma = 0.8 + 0.8 * torch.rand(1, generator=g).item()
            r = torch.arange(-3, 4, dtype=x.dtype)
            k = torch.exp(-r**2 / (2 * sigma**2))
            k = (k / k.sum())
            xi = F.conv2d(F.pad(xi, (3, 3, 3, 3), mode="replicate"), (k[:, None] * k[None])[None, None])
        elif name == "speckle":
            amp = 0.3 + 0.5 * torch.rand(len(xi), 1, 1, 1, generator=g)
            xi = (xi + amp * torch.randn(xi.shape, generator=g)).clamp(-1, 1)
        elif name == "broken":  # 2-4 square holes of 4-7 px across the strokes
            for j in range(len(xi)):
                for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
                    w = int(torch.randint(4, 8, (1,), generator=g))
                    r0, c0 = (int(v) for v in torch.randint(4, 28 - w, (2,), generator=g))
                    xi[j, :, r0:r0 + w, c0:c0 + w] = -1.0
        elif name == "thick":
            xi = F.max_pool2d(xi, 3, 1, 1)
        else:  # thin
            xi = -F.max_pool2d(-xi, 3, 1, 1)
        out[m] = xi
    return out


def noised_pairs(x: Tensor, g: torch.Generator, s_max: float = 0.9):
    """``(real_s, degraded_s, s)``: both at one flow time per pair, ``s = s_max u^2`` (more weight near
    the data), with the same noise."""
    s = s_max * torch.rand(len(x), generator=g) ** 2
    eps = torch.randn(x.shape, generator=g)
    sv = s[:, None, None, None]
    return (1 - sv) * x + sv * eps, (1 - sv) * degrade(x, g) + sv * eps, s


def load_reward(name_or_path: str = "mnist_reward") -> tuple[NoisyReward, dict]:
    """The frozen reward network of a shipped or given weights file, and its source ``{"path", "sha256"}``."""
    net, source = load_shipped(WEIGHTS, name_or_path, NoisyReward)
    return net.eval().requires_grad_(False), source


@torch.no_grad()
def pairwise_accuracy(net: NoisyReward, x: Tensor, seed: int = 1) -> float:
    """How often a real digit scores above its degraded copy, both noised alike (a held-out set)."""
    g = torch.Generator().manual_seed(seed)
    hits = 0
    for xb in x.split(250):
        real, bad, s = noised_pairs(xb, g)
        hits += int((net(real, s) > net(bad, s)).sum())
    return hits / len(x)


@torch.no_grad()
def class_blindness(net: NoisyReward, x: Tensor, y: Tensor, seed: int = 2) -> dict:
    """On clean digits (``s = 0``): ``class_spread``, the largest minus the smallest per-class mean
    score, against ``quality_gap``, the mean score of real digits minus that of degraded copies. A
    reward that is not a class proxy has a spread well under the gap (raising it should not buy a
    class); ``class_spread_over_gap`` is their ratio."""
    g = torch.Generator().manual_seed(seed)
    zero = torch.zeros(len(x))
    real = torch.cat([net(xb, sb) for xb, sb in zip(x.split(500), zero.split(500))])
    bad = torch.cat([net(degrade(xb, g), sb) for xb, sb in zip(x.split(500), zero.split(500))])
    means = torch.stack([real[y == c].mean() for c in y.unique()])
    spread, gap = float(means.max() - means.min()), float(real.mean() - bad.mean())
    return {"class_spread": round(spread, 4), "quality_gap": round(gap, 4),
            "class_spread_over_gap": round(spread / gap, 4)}


def train(out: str, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
          anchor: float = 0.1) -> dict:
    """The pairwise logistic loss ``softplus(r(degraded_s) - r(real_s))`` on the training digits (their
    labels are never read) plus ``anchor * r(real_s)^2``, which pins every real digit's score at 0; the
    held-out pairwise accuracy and class blindness are in the meta."""
    from common.data.embedded import load_tensors

    x, _ = load_tensors("mnist", "train")
    x_val, y_val = load_tensors("mnist", "heldout")  # the labels only group the held-out figure by class
    spec = {"target": "projects.flash_dmd.reward.NoisyReward", "in_channels": 1, "widths": [32, 64, 96], "tdim": 64}

    def loss(net, g):
        real, bad, s = noised_pairs(x[torch.randint(len(x), (batch_size,), generator=g)], g)
        r_real = net(real, s)
        # the pairwise loss fixes only score differences within a pair, which leaves each digit's own level
        # free (it drifted with the class: zeros 43, ones 9); pinning the real digits' scores at 0 says
        # that every real digit is equally good, whatever its class
        return F.softplus(net(bad, s) - r_real).mean() + anchor * r_real.square().mean()

    def heldout(net):
        return {"heldout_pairwise_accuracy": pairwise_accuracy(net, x_val), **class_blindness(net, x_val, y_val)}

    return train_small(spec, loss, out, steps=steps, lr=lr, seed=seed, desc="reward", evaluate=heldout,
                       recipe="python -m projects.flash_dmd.reward", batch_size=batch_size, anchor=anchor)


if __name__ == "__main__":
    recipe_main(__doc__, str(WEIGHTS["mnist_reward"]), 3000, train)
