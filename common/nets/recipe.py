"""The training loop and command line that the small shipped networks' recipes share (the autoencoder,
common/nets/autoencoder.py; Flash-DMD's reward, projects/flash_dmd/reward.py): AdamW with a cosine
decay over a fixed number of steps, a progress bar with the last loss, and the weights file written
with its spec and a ``meta`` that says how it was made."""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch import Tensor, nn

from common.teachers.embedded import build_net, file_sha256, load_weights, save_weights


def train_small(spec: dict, loss: Callable[[nn.Module, torch.Generator], Tensor], out: str, *, steps: int,
                lr: float = 1e-3, seed: int = 0, desc: str = "train",
                evaluate: Callable[[nn.Module], dict] | None = None, **meta) -> dict:
    """Build ``spec``, take ``steps`` AdamW steps (weight decay 1e-4, cosine decay) on ``loss(net, g)``
    (``g`` the recipe's seeded generator for its batches), then save the weights to ``out`` with the
    meta: the recipe's own entries, the seed, steps, lr, training time and ``evaluate(net)`` (held-out
    figures, in eval mode without gradient)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    net = build_net(spec)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in (bar := tqdm(range(steps), desc=desc)):
        value = loss(net, g)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{value.item():.4f}")
    net.eval()
    meta = {**meta, "steps": steps, "lr": lr, "seed": seed, "train_seconds": round(time.time() - t0, 1)}
    if evaluate is not None:
        with torch.no_grad():
            meta.update(evaluate(net))
    save_weights(out, spec, net.state_dict(), meta)
    return meta


def load_shipped(weights: dict, name_or_path: str, cls: type) -> tuple[nn.Module, dict]:
    """The network of a shipped (a name in ``weights``) or given weights file, checked to be a ``cls``,
    and its source ``{"path", "sha256"}``; the caller freezes what it uses."""
    from pathlib import Path

    path = weights.get(name_or_path, Path(name_or_path))
    ckpt = load_weights(path)
    net = build_net(ckpt["net"])
    if not isinstance(net, cls):
        raise ValueError(f"{path} holds a {type(net).__name__}, not a {cls.__name__}")
    net.load_state_dict(ckpt["state_dict"])
    return net, {"path": str(path), "sha256": file_sha256(path)}


def recipe_main(doc: str, default_out: str, default_steps: int, train: Callable[..., dict]) -> None:
    """``python -m <recipe> [--out FILE] [--steps N] [--seed S]``: ``train(out, steps, seed=seed)``, its
    meta printed."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--out", default=default_out, help="the weights file to write (default: the shipped one)")
    ap.add_argument("--steps", type=int, default=default_steps)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(train(a.out, a.steps, seed=a.seed))
