"""Markdown tables of the benchmark JSONs (what docs/benchmarks.md shows).

.venv/bin/python benchmarks/render_tables.py benchmarks/results
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from din_torchrec.bench.plots import implementation_rank


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
        "| model | implementation | test AUC | logloss | train samples/s | last epoch samples/s | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for x in sorted(r["results"], key=lambda x: (x["model"], implementation_rank(x["implementation"]))):
        lines.append(
            f"| {x['model']} | {x['implementation']} | {x['auc']:.4f} | {x['logloss']:.4f} | "
            f"{x['train_samples_per_s']:,.0f} | {x['epochs'][-1]['train_samples_per_s']:,.0f} | "
            f"{x.get('peak_rss_mb', 0):.0f} |"
        )
    lines.append("")
    for k, q in r.get("ratios", {}).items():
        last = q.get("last_epoch_samples_per_s_ratio")
        lines.append(
            f"- {k} vs deepctr_torch: **x{q['samples_per_s_ratio']:.1f}** samples/s"
            + (f" (last epoch x{last:.1f})" if last else "")
            + f", AUC {q['auc_difference']:+.4f}"
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


def gpu_check(r: dict) -> str:
    lines = [
        f"{r['device_name']}, torch {r['torch']}, {r['preset']} preset; {r['timing']}",
        "",
        "| dtype | case | reference | B | fast samples/s | reference samples/s | speed-up (best) | speed-up (median) | max diff out |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["results"]:
        if "error" in x:
            lines.append(f"| {x['dtype']} | {x['name']} | failed: {x['error']} | {x['batch']} | | | | | |")
            continue
        lines.append(
            f"| {x['dtype']} | {x['name']} | {x['reference']} | {x['batch']} | {x['samples_per_s_fast']:,.0f} | "
            f"{x['samples_per_s_reference']:,.0f} | **{x['speedup']:.1f}x** | {x['speedup_median']:.1f}x | "
            f"{x['max_abs_diff']:.0e} |"
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
    for path in sorted((f / "gpu").glob("gpu_check*.json")):
        print(f"### {path.stem}\n\n{gpu_check(json.loads(path.read_text()))}\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
