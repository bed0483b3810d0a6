"""STREAM-style memory bandwidth of this machine, the yardstick for the embedding benchmarks.

``copy``: ``b[:] = a`` on arrays far larger than the last-level cache; STREAM counts the bytes read plus the
bytes written (``2 * nbytes``). Best of ``repeats`` (the machine may be shared: the best run is the least
disturbed one). Measured with numpy (one thread) and with torch (``torch.get_num_threads()`` threads).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch


def _best_seconds(fn, repeats: int) -> float:
    fn()  # touch the pages first
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def stream_copy(size_mb: float = 512.0, repeats: int = 5) -> dict[str, Any]:
    """Copy bandwidth in GB/s (1e9 bytes) with numpy and torch, and the best of the two.

    Args:
        size_mb: size of each of the two arrays in MiB (use >= 4x the last-level cache).
        repeats: timed copies per library; the fastest counts.
    """
    n = max(1, int(size_mb * 2**20) // 8)
    a = np.ones(n, dtype=np.float64)
    b = np.empty_like(a)
    np_s = _best_seconds(lambda: np.copyto(b, a), repeats)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch_s = _best_seconds(lambda: tb.copy_(ta), repeats)
    moved = 2.0 * a.nbytes
    result = {
        "array_mb": a.nbytes / 2**20,
        "repeats": repeats,
        "numpy_copy_gbs": moved / np_s / 1e9,
        "torch_copy_gbs": moved / torch_s / 1e9,
        "torch_threads": torch.get_num_threads(),
    }
    result["best_gbs"] = max(result["numpy_copy_gbs"], result["torch_copy_gbs"])
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(stream_copy(), indent=2))
