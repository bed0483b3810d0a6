"""Bytes on disk and reader peak memory of the ``flat`` and ``referenced`` layouts of the same data.

``measure_layouts(flat_dir, referenced_dir)`` sums the parquet bytes of each folder's ``train/``, ``test/``
and ``histories/`` and runs, for each layout, one epoch of the train split through its reader in a fresh
child process, reporting the child's resident memory after the imports (baseline) and its peak while
reading (``VmHWM``, reset after the imports through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is
not possible), so the difference is what the reader itself needed.

Command line (``--synthetic-amazon`` first writes Amazon-format files of the given size with 5-core-like
history lengths, then prepares both layouts from them)::

    python -m din_torchrec.data.prepare.measure --synthetic-amazon /tmp/amz --users 192403 --items 63001
    python -m din_torchrec.data.prepare.measure --flat data/amz_flat --referenced data/amz_ref
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["layout_bytes", "measure_layouts", "reader_memory", "write_synthetic_amazon"]


def layout_bytes(root: str | Path) -> dict[str, int]:
    """Parquet bytes per folder (``train``, ``test``, ``histories``) and their ``total``."""
    root = Path(root)
    out = {}
    for d in ("train", "test", "histories"):
        out[d] = sum(p.stat().st_size for p in (root / d).rglob("*.parquet")) if (root / d).exists() else 0
    out["total"] = sum(out.values())
    return out


_CHILD = r"""
import json, resource, sys, time
from din_torchrec.config import load_config
from din_torchrec.data.referenced import open_reader

def status_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")

root, split, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
cfg = load_config(f"{root}/experiment.yaml")
try:  # reset the peak (VmHWM) so that the imports' transient peak does not hide the reader's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
base = status_mb("VmRSS")
start = time.perf_counter()
reader = open_reader(f"{root}/{split}", cfg.features, **kw)
opened = status_mb("VmRSS")
rows = batches = cells = 0
for b in reader:
    batches += 1
    rows += b.batch_size
    cells += int(b.hist_lengths.sum())
seconds = time.perf_counter() - start
peak = status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"reader": type(reader).__name__, "baseline_rss_mb": round(base, 1),
    "rss_after_open_mb": round(opened, 1), "peak_rss_mb": round(peak, 1),
    "peak_above_baseline_mb": round(peak - base, 1), "peak_reset": reset,
    "batches": batches, "rows": rows, "history_cells": cells, "seconds": round(seconds, 2),
    "rows_per_s": round(rows / seconds, 1)}))
"""


def reader_memory(root: str | Path, split: str = "train", **reader_kwargs: Any) -> dict[str, Any]:
    """One epoch of ``root/split`` through :func:`~din_torchrec.data.referenced.open_reader` in a child
    process (features from ``root/experiment.yaml``); its memory and speed figures."""
    cmd = [sys.executable, "-c", _CHILD, str(root), split, json.dumps(reader_kwargs)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"reader child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_layouts(
    flat_dir: str | Path,
    referenced_dir: str | Path,
    *,
    batch_size: int = 1024,
    max_history: int = 100,
    shuffle_buffer: int = 65_536,
) -> dict[str, Any]:
    """Disk bytes and train-split reader memory of both layouts (see the module docstring)."""
    kw = {"batch_size": batch_size, "max_history": max_history, "shuffle_buffer": shuffle_buffer}
    out: dict[str, Any] = {"reader_args": kw}
    for name, root in (("flat", flat_dir), ("referenced", referenced_dir)):
        out[name] = {"bytes": layout_bytes(root), "reader": reader_memory(root, "train", **kw)}
    out["disk_ratio_flat_over_referenced"] = round(
        out["flat"]["bytes"]["total"] / max(1, out["referenced"]["bytes"]["total"]), 2
    )
    return out


def write_synthetic_amazon(
    out_dir: str | Path, users: int = 192_403, items: int = 63_001, categories: int = 801, seed: int = 0
) -> tuple[Path, Path]:
    """``reviews_Synthetic_5.json.gz`` + ``meta_Synthetic.json.gz`` in the 2014 formats, sized like the
    Electronics 5-core file by default: every user has >= 5 reviews, lengths heavy-tailed (mean ~8.8, max in
    the hundreds), items by a Zipf-like popularity, timestamps in days."""
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lengths = np.minimum(5 + np.floor(rng.pareto(1.6, users) * 2.3).astype(np.int64), 400)
    pop = 1.0 / np.arange(1, items + 1) ** 0.9
    pop /= pop.sum()
    all_items = rng.choice(items, size=int(lengths.sum()), p=pop)
    days = rng.integers(0, 5000, size=len(all_items))
    reviews = out / "reviews_Synthetic_5.json.gz"
    with gzip.open(reviews, "wt", compresslevel=1) as f:
        pos = 0
        for u, n in enumerate(lengths.tolist()):
            uid = f"A{u:013d}"
            for j in range(pos, pos + n):
                f.write(
                    f'{{"reviewerID": "{uid}", "asin": "B{int(all_items[j]):09d}", "helpful": [0, 0], '
                    f'"reviewText": "ok", "overall": 5.0, "unixReviewTime": {1_000_000_000 + 86400 * int(days[j])}}}\n'
                )
            pos += n
    meta = out / "meta_Synthetic.json.gz"
    cats = rng.integers(0, categories, size=items)
    with gzip.open(meta, "wt", compresslevel=1) as f:
        for i in range(items):
            f.write(
                repr({"asin": f"B{i:09d}", "categories": [["Electronics", f"Leaf {int(cats[i])}"]]}) + "\n"
            )
    return reviews, meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flat", help="a dataset folder in the flat layout")
    p.add_argument("--referenced", help="the same data in the referenced layout")
    p.add_argument(
        "--synthetic-amazon", metavar="DIR", help="write synthetic Amazon files to DIR, prepare both"
    )
    p.add_argument("--users", type=int, default=192_403)
    p.add_argument("--items", type=int, default=63_001)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--max-history", type=int, default=100)
    p.add_argument("--shuffle-buffer", type=int, default=65_536)
    a = p.parse_args(argv)
    timings = {}
    if a.synthetic_amazon:
        from din_torchrec.data.prepare import prepare_amazon

        d = Path(a.synthetic_amazon)
        t = time.perf_counter()
        reviews, meta = write_synthetic_amazon(d, a.users, a.items)
        timings["write_synthetic_s"] = round(time.perf_counter() - t, 1)
        for layout in ("flat", "referenced"):
            t = time.perf_counter()
            prepare_amazon(reviews, meta, d / layout, layout=layout)
            timings[f"prepare_{layout}_s"] = round(time.perf_counter() - t, 1)
        a.flat, a.referenced = d / "flat", d / "referenced"
    if not (a.flat and a.referenced):
        p.error("give --flat and --referenced, or --synthetic-amazon")
    result = measure_layouts(
        a.flat,
        a.referenced,
        batch_size=a.batch_size,
        max_history=a.max_history,
        shuffle_buffer=a.shuffle_buffer,
    )
    result.update(timings)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
