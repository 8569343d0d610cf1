"""Build the 2-D toy mixtures as shards: ``8gaussians`` and ``checkerboard``.

Each sample is one point (``npy``, float32 (2,)) with the index of its mode (``cls``): one of the
8 Gaussians, or one of the 8 filled cells of the checkerboard. Mode centres are in
:data:`MODES` and are used by the mode-coverage metric.

    python data/build_toy2d.py [OUT_DIR]
"""
from __future__ import annotations

import io
import sys

import numpy as np

NUM_POINTS = {"train": 10000, "heldout": 2000}
SEEDS = {"train": 1, "heldout": 2}
GAUSS_RADIUS, GAUSS_STD = 2.0, 0.1


def _gauss_centres() -> np.ndarray:
    ang = np.arange(8) * 2 * np.pi / 8
    return GAUSS_RADIUS * np.stack([np.cos(ang), np.sin(ang)], 1)


def _checker_centres() -> np.ndarray:
    # 4x4 board on [-2, 2]^2, the 8 cells where (i + j) is even are filled
    cells = [(i, j) for i in range(4) for j in range(4) if (i + j) % 2 == 0]
    return np.array([(-1.5 + i, -1.5 + j) for i, j in cells], dtype=np.float64)


MODES = {"8gaussians": _gauss_centres(), "checkerboard": _checker_centres()}
MODE_RADIUS = {"8gaussians": 4 * GAUSS_STD, "checkerboard": 0.5}  # a point within this (Chebyshev for cells) counts


def sample(name: str, n: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    modes = rng.randint(0, 8, size=n)
    c = MODES[name][modes]
    if name == "8gaussians":
        pts = c + GAUSS_STD * rng.randn(n, 2)
    elif name == "checkerboard":
        pts = c + rng.uniform(-0.5, 0.5, size=(n, 2))
    else:
        raise ValueError(f"unknown toy {name!r}; expected one of {sorted(MODES)}")
    return pts.astype(np.float32), modes


def build(out_dir: str) -> None:
    from common.data.shards import write_shards

    for name in MODES:
        for split, n in NUM_POINTS.items():
            pts, modes = sample(name, n, np.random.RandomState(SEEDS[split]))

            def gen(pts=pts, modes=modes):
                for i in range(len(pts)):
                    buf = io.BytesIO()
                    np.save(buf, pts[i])
                    yield {"__key__": f"{i:06d}", "npy": buf.getvalue(), "cls": str(int(modes[i]))}

            write_shards(out_dir, f"{name}-{split}", gen(), maxcount=5000)


if __name__ == "__main__":
    from common.data.embedded import cache_root

    build(sys.argv[1] if len(sys.argv) > 1 else str(cache_root() / "toy2d"))
