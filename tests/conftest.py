import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "launchers"))

import common  # noqa: E402

if ROOT not in Path(common.__file__).resolve().parents:
    raise ImportError(f"'common' is imported from {common.__file__}, not from this repository: "
                      f"another installed package shadows it")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))


TINY_DIT = {"target": "common.nets.dit.DiT", "image_size": 32, "in_channels": 1, "patch_size": 8, "dim": 16,
            "depth": 4, "heads": 2, "mlp_ratio": 2.0, "num_classes": 10}


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A weights file of a tiny random DiT shaped like the embedded teacher (32x32, 10 classes, 4 blocks,
    16 tokens): per-method tests train on it in seconds; runs on the real teacher belong to
    launchers/benchmark.py."""
    import torch

    from common.teachers.embedded import build_net, save_weights

    torch.manual_seed(0)
    net = build_net(TINY_DIT)
    path = tmp_path_factory.mktemp("tiny") / "tiny_dit.pt"
    save_weights(path, TINY_DIT, net.state_dict(), {"note": "random weights, tests only"})
    return str(path)


@pytest.fixture
def attention_jvp_calls(monkeypatch):
    """A list that grows by one each time an attention's tangent goes through common/kernels'
    _TangentAttention (the F3 route; plain math attention's JVP through sdpa fails on the CPU)."""
    from common.kernels import attention_jvp

    calls = []
    original = attention_jvp._TangentAttention.jvp

    def counting(ctx, *tangents):
        calls.append(ctx)
        return original(ctx, *tangents)

    monkeypatch.setattr(attention_jvp._TangentAttention, "jvp", staticmethod(counting))
    return calls
