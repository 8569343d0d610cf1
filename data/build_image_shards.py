"""Write CIFAR-10 (the python version you already have on disk) as image shards for
``common.data.datamodule.ShardDataModule``: ``<out>/train-*.tar`` with ``png`` and ``cls`` members.

    python data/build_image_shards.py /path/to/cifar-10-batches-py data/cifar10
"""
from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np


def cifar10_train(folder: Path):
    """The 50,000 training images as uint8 (N, 32, 32, 3) and their labels, from ``data_batch_1..5``."""
    images, labels = [], []
    for i in range(1, 6):
        path = folder / f"data_batch_{i}"
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR-10 batch not found: {path}")
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        images.append(d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels += list(d[b"labels"])
    return np.concatenate(images).astype(np.uint8), np.asarray(labels, dtype=np.int64)


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from common.data.shards import encode_png, write_shards

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cifar_dir", type=Path, help="the extracted cifar-10-batches-py folder")
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    x, y = cifar10_train(args.cifar_dir)
    paths = write_shards(args.out, "train", ({"__key__": f"{i:06d}", "png": encode_png(x[i]), "cls": str(int(y[i]))}
                                             for i in range(len(x))), maxcount=5000)
    print(f"wrote {len(x)} images in {len(paths)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
