"""One benchmark configuration in a fresh process: ``python -m common.kernels.bench_child METHOD N``.

Prints one JSON line: median seconds of the operation and its peak resident memory above the
process's baseline (taken after the inputs exist), so configurations cannot contaminate each other.
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from common.kernels.attention_jvp import attention_jvp
from common.nets.attention import math_attention


def main(method: str, n: int, heads: int = 8, d: int = 64, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    q, k, v, dq, dk, dv = (torch.randn(1, heads, n, d) for _ in range(6))
    ops = {
        "sdpa_forward": lambda: F.scaled_dot_product_attention(q, k, v),
        "efficient_jvp": lambda: attention_jvp(q, k, v, dq, dk, dv),
        "math_func_jvp": lambda: torch.func.jvp(math_attention, (q, k, v), (dq, dk, dv)),
    }
    op = ops[method]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            out = op()
            dt = time.perf_counter() - t0
            del out
            if i:
                times.append(dt)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "n": n, "seconds": statistics.median(times), "peak_mib": (peak - base) / 1024}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
