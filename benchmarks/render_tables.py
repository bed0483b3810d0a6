"""Markdown tables of the benchmark JSONs (what docs/benchmarks.md shows).

.venv/bin/python benchmarks/render_tables.py benchmarks/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(folder: Path, name: str) -> dict | None:
    p = folder / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def embeddings(r: dict) -> str:
    bw = r["memory_bandwidth"]
    lines = [
        f"STREAM copy: numpy {bw['numpy_copy_gbs']:.1f} GB/s, torch {bw['torch_copy_gbs']:.1f} GB/s "
        f"({bw['array_mb']:.0f} MiB arrays, best of {bw['repeats']})",
        "",
        "| sweep | rows | dim | pooling | batch | dtype | kernel | mode | sharding | ws | M lookups/s | row GB/s | % of STREAM (same rounds) |",
        "|---|---:|---:|---:|---:|---|---|---|---|---:|---:|---:|---:|",
    ]
    for x in r["results"]:
        lines.append(
            f"| {x['sweep']} | {x['rows']:,} | {x['dim']} | {x['pooling']} | {x['batch']} | {x['dtype']} | {x['kernel']} | "
            f"{x['mode']} | {x['sharding'] or ''} | {x['world_size']} | {x['lookups_per_s'] / 1e6:.2f} | {x['row_gbs']:.2f} | "
            f"{100 * x['fraction_of_bandwidth']:.0f}% |"
        )
    if r.get("skipped"):
        lines.append("")
        lines.append(
            "Skipped: "
            + "; ".join(
                f"rows {s['rows']:,} dim {s['dim']} {s['dtype']} ({s['reason']})" for s in r["skipped"]
            )
        )
    return "\n".join(lines)


def train(r: dict) -> str:
    lines = [
        "| model | samples/s | ms/step | forward | backward | optimizer | other | peak RSS MiB (+ model) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["results"]:
        sh = x["shares"]
        lines.append(
            f"| {x['model']} | {x['samples_per_s']:,.0f} | {x['ms_per_step']:.0f} | {100 * sh['forward']:.0f}% | "
            f"{100 * sh['backward']:.0f}% | {100 * sh['optimizer']:.0f}% | {100 * sh['other']:.0f}% | "
            f"{x['peak_rss_mb']:.0f} (+{x['peak_rss_delta_mb']:.0f}) |"
        )
    return "\n".join(lines)


def kernels(r: dict) -> str:
    lines = [
        "| case | reference | B | N rows | fast ms | reference ms | speed-up (best) | speed-up (median) | max diff out / grad |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for x in r["results"]:
        g = x.get("max_abs_grad_diff")
        lines.append(
            f"| {x['name']} | {x['reference']} | {x['batch']} | {x['rows']:,} | {x['fast_ms']:.1f} | {x['reference_ms']:.1f} | "
            f"**{x['speedup']:.1f}x** | {x['speedup_median']:.1f}x | {x['max_abs_diff']:.0e} / {'-' if g is None else f'{g:.0e}'} |"
        )
    return "\n".join(lines)


def compare(r: dict) -> str:
    lines = [
        "| model | implementation | test AUC | logloss | train samples/s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|",
    ]
    order = {
        "din_torchrec": 0,
        "din_torchrec+compile": 1,
        "din_torchrec+bf16": 2,
        "din_torchrec+bf16+compile": 3,
        "deepctr_torch": 9,
    }
    for x in sorted(r["results"], key=lambda x: (x["model"], order.get(x["implementation"], 9))):
        lines.append(
            f"| {x['model']} | {x['implementation']} | {x['auc']:.4f} | {x['logloss']:.4f} | "
            f"{x['train_samples_per_s']:,.0f} | {x.get('peak_rss_mb', 0):.0f} |"
        )
    lines.append("")
    for k, q in r.get("ratios", {}).items():
        lines.append(
            f"- {k} vs deepctr_torch: **x{q['samples_per_s_ratio']:.1f}** samples/s, AUC {q['auc_difference']:+.4f}"
        )
    return "\n".join(lines)


def prefetch(r: dict) -> str:
    lines = ["| contender | ms/batch | samples/s |", "|---|---:|---:|"]
    for x in r["results"]:
        lines.append(f"| {x['name']} | {x['ms_per_batch']:.1f} | {x['samples_per_s']:,.0f} |")
    s = r["summary"]
    lines.append("")
    lines.append(
        f"prefetch / sequential: x{s['speedup_over_sequential']:.2f} (perfect overlap would take "
        f"{s['ideal_seconds']:.2f} s instead of {s['sequential_bound_seconds']:.2f} s)"
    )
    return "\n".join(lines)


def main(folder: str) -> None:
    f = Path(folder)
    for name, fn in (
        ("embeddings", embeddings),
        ("train", train),
        ("kernels", kernels),
        ("prefetch", prefetch),
        ("compare", compare),
    ):
        r = _load(f, name) or _load(f / name, name)
        if r is not None:
            print(f"### {name}\n\n{fn(r)}\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
