"""The non-finite guard under DDP (2 gloo processes on the CPU, started by torch.distributed.run): the
skip decision is agreed across ranks, so when only one rank sees a non-finite loss both skip that step
together, count it once, and go on; a per-rank decision would leave one rank in a gradient all-reduce
the other never enters, and the run would hang (the timeout catches that)."""
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(out, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(ROOT / "tests" / "ddp_worker.py"), str(out), *args]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process run hung (ranks took different branches of the non-finite guard)")
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_one_rank_nonfinite_both_skip_once_and_stay_in_sync(tmp_path):
    a, b = _run(tmp_path / "nan", "--nan-rank", "1", "--nan-at", "2", "--iterations", "5")
    assert a["world"] == b["world"] == 2
    for r in (a, b):  # 5 iterations of student + critic; the student step of iteration 2 skipped everywhere
        assert (r["skipped"], r["iteration"], r["global_step"], r["ema_step"]) == (1, 5, 9, 4)
    assert a["params"] == b["params"]  # the ranks' gradients differ; their synced weights do not

