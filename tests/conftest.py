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
