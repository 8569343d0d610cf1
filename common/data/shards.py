"""WebDataset shards: writing, and reading small embedded sets into memory.

A shard is a plain tar file whose members are ``<key>.<ext>`` (the WebDataset layout), so the
same files stream through ``webdataset.WebDataset`` at scale.
Embedded sets are small (a few MB), so :func:`read_shards` decodes them once into arrays: that
gives random access, which makes the data order a pure function of (seed, sample index) and so
exactly resumable and independent of the number of ranks and workers.

A sample that fails to decode is skipped with a counted warning; a set with nothing readable
is an error.
"""
from __future__ import annotations

import glob
import io
import logging
import os
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

log = logging.getLogger(__name__)


class NoReadableData(RuntimeError):
    pass


def encode_png(img_u8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img_u8).save(buf, format="PNG")
    return buf.getvalue()


DECODERS = {
    "png": lambda b: np.array(Image.open(io.BytesIO(b)), dtype=np.uint8),
    "cls": lambda b: int(b.decode().strip()),
    "npy": lambda b: np.load(io.BytesIO(b), allow_pickle=False),
}


def write_shards(out_dir: str | os.PathLike, prefix: str, samples, maxcount: int = 2000) -> list[str]:
    """Write an iterable of WebDataset sample dicts (``__key__`` plus ext -> value) into shards."""
    os.makedirs(out_dir, exist_ok=True)
    pattern = os.path.join(str(out_dir), f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    return sorted(glob.glob(os.path.join(str(out_dir), f"{prefix}-*.tar")))


def _iter_members(path: str, stats: dict):
    """Yield (name, bytes) of a tar shard; a truncated or corrupt tail is counted and skipped."""
    def bad(why):
        stats["corrupt_shards"] += 1
        log.warning("shard %s: %s; rest of shard skipped", path, why)

    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r") as tf:
            while True:
                try:
                    m = tf.next()
                except (tarfile.TarError, EOFError, OSError) as e:
                    return bad(f"unreadable header ({e})")
                if m is None:
                    if tf.offset + 2 * tarfile.BLOCKSIZE > size:  # no end-of-archive marker: cut short
                        bad("truncated (no end-of-archive marker)")
                    return
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    return bad(f"member {m.name} is truncated")
                try:
                    data = tf.extractfile(m).read()
                except (tarfile.TarError, EOFError, OSError) as e:
                    return bad(f"member {m.name} unreadable ({e})")
                stats["members"] += 1
                yield m.name, data
    except (tarfile.TarError, EOFError, OSError) as e:
        stats["corrupt_shards"] += 1
        log.warning("shard %s cannot be opened (%s); skipped", path, str(e).splitlines()[0].rstrip(":"))


def read_shards(paths: list[str], fields: dict[str, str], checks: dict | None = None
                ) -> tuple[dict[str, np.ndarray], dict]:
    """Decode every sample of ``paths`` into stacked arrays.

    ``fields`` maps an output name to a member extension, e.g. ``{"image": "png", "label": "cls"}``;
    ``checks`` maps an output name to a function of a decoded value that returns what is wrong with
    it (or None), e.g. a label outside the set's classes. A sample that fails to decode, fails a
    check, or has another shape than most samples of its field is skipped with a warning naming its
    shard and key, and counted.
    Returns the arrays (sorted by shard, then order in shard) and counters
    ``{"samples", "corrupt_samples", "corrupt_shards", "members"}``.
    """
    if not paths:
        raise FileNotFoundError("no shard files given")
    stats = defaultdict(int)
    checks = checks or {}
    out: dict[str, list] = {k: [] for k in fields}
    keys: list[str] = []
    where: list[str] = []

    def skip(path, key, why):
        stats["corrupt_samples"] += 1
        log.warning("shard %s: sample %r is corrupt (%s); skipped", path, key, why)

    for path in paths:
        groups: dict[str, dict[str, bytes]] = {}
        for name, data in _iter_members(path, stats):
            key, _, ext = os.path.basename(name).partition(".")
            groups.setdefault(key, {})[ext] = data
        for key, members in groups.items():
            try:  # an extension names its decoder by its last part: "latent.npy" is an npy member
                decoded = {k: DECODERS[ext.rpartition(".")[2]](members[ext]) for k, ext in fields.items()}
            except Exception as e:  # noqa: BLE001 - any decode failure means a corrupt sample
                skip(path, key, f"{type(e).__name__}: {e}")
                continue
            wrong = next((f"{k}: {msg}" for k, fn in checks.items() if (msg := fn(decoded[k]))), None)
            if wrong:
                skip(path, key, wrong)
                continue
            for k, v in decoded.items():
                out[k].append(v)
            keys.append(key)
            where.append(path)
    keep = np.ones(len(keys), dtype=bool)
    for k, values in out.items():  # one shape per field: the most common one; others are corrupt
        shapes = [np.shape(v) for v in values]
        if len(set(shapes)) > 1:
            common = max(set(shapes), key=shapes.count)
            for i, s in enumerate(shapes):
                if s != common and keep[i]:
                    keep[i] = False
                    skip(where[i], keys[i], f"{k} has shape {s}, the set's samples {common}")
    if not keep.all():
        out = {k: [v for v, ok in zip(vs, keep) if ok] for k, vs in out.items()}
        keys = [k for k, ok in zip(keys, keep) if ok]
    stats["samples"] = len(keys)
    if not keys:
        raise NoReadableData(f"no readable sample in {len(paths)} shard(s): {paths[0]} ...")
    if stats["corrupt_samples"] or stats["corrupt_shards"]:
        log.warning("read %d samples from %d shard(s); skipped %d corrupt sample(s), %d corrupt shard tail(s)",
                    stats["samples"], len(paths), stats["corrupt_samples"], stats["corrupt_shards"])
    arrays = {k: np.stack(v) for k, v in out.items()}
    arrays["__key__"] = np.array(keys)
    return arrays, dict(stats)


def shard_paths(directory: str | Path, prefix: str) -> list[str]:
    paths = sorted(glob.glob(os.path.join(str(directory), f"{prefix}-*.tar")))
    if not paths:
        raise FileNotFoundError(f"no shards {prefix}-*.tar in {directory}")
    return paths
