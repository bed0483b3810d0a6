"""PNG charts of the benchmark JSONs (matplotlib, Agg backend)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(r: dict[str, Any]) -> str:
    s = f"{r['kernel']} {r['mode']}"
    if r.get("sharding") and r["kernel"].startswith("torchrec"):
        s += f" {r['sharding']} ws{r['world_size']}"
    return s


def plot_embeddings(report: dict[str, Any], path: str | Path) -> None:
    """One panel per swept axis: row GB/s of every kernel, with the measured STREAM bandwidth."""
    plt = _plt()
    results = report["results"]
    sweeps = []
    for r in results:
        if r["sweep"] not in sweeps:
            sweeps.append(r["sweep"])
    n = max(1, len(sweeps))
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    bw = report["memory_bandwidth"]["best_gbs"]
    numeric = {"rows", "dim", "pooling", "batch"}
    for ax, sweep in zip(axes.flat, sweeps):
        rs = [r for r in results if r["sweep"] == sweep]
        if sweep in numeric:
            series: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for r in rs:
                series[_label(r)].append((r[sweep], r["row_gbs"]))
            for lab, pts in series.items():
                pts.sort()
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=lab)
            ax.set_xscale("log")
            ax.set_xlabel(sweep)
        else:
            labels = [f"{_label(r)} {r['dtype']}" if sweep == "dtype" else _label(r) for r in rs] or [
                "(none)"
            ]
            values = [r["row_gbs"] for r in rs] or [0.0]
            ax.barh(range(len(values)), values)
            ax.set_yticks(range(len(values)))
            ax.set_yticklabels(labels, fontsize=7)
            ax.set_xlabel("row GB/s")
        ax.axhline(bw, color="k", ls="--", lw=1) if sweep in numeric else ax.axvline(
            bw, color="k", ls="--", lw=1
        )
        ax.set_title(f"sweep: {sweep} (dashed: STREAM copy {bw:.1f} GB/s)", fontsize=9)
        if sweep in numeric:
            ax.set_ylabel("row GB/s")
            ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Embedding lookups: bytes of rows read per second (uniform ids)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_train(report: dict[str, Any], path: str | Path) -> None:
    """Samples/s per model and the forward / backward / optimizer shares of a step."""
    plt = _plt()
    rs = report["results"]
    names = [r["model"] for r in rs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.bar(names, [r["samples_per_s"] for r in rs])
    a1.set_ylabel("training samples/s")
    a1.set_title("end-to-end training step")
    for i, r in enumerate(rs):
        a1.text(
            i,
            r["samples_per_s"],
            f"{r['samples_per_s']:,.0f}\n{r['peak_rss_mb']:.0f} MiB",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    bottom = [0.0] * len(rs)
    for part in ("forward", "backward", "optimizer", "other"):
        vals = [r["shares"].get(part, 0.0) for r in rs]
        a2.bar(names, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    a2.set_ylabel("share of step time")
    a2.set_ylim(0, 1.05)
    a2.legend(fontsize=8)
    a2.set_title("where a step's time goes")
    s = report["settings"]
    fig.suptitle(f"history {s['history']}, dim {s['dim']}, batch {s['batch']} ({s['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_speedups(report: dict[str, Any], path: str | Path, title: str) -> None:
    """Horizontal bars of ``speedup`` per row of ``report['results']`` (kernels and gpu-check)."""
    plt = _plt()
    rs = [r for r in report["results"] if r.get("speedup") is not None]
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(rs), 2) + 1.2))
    labels = [r["name"] + (f" [{r['dtype']}]" if r.get("dtype") else "") for r in rs]
    ax.barh(range(len(rs)), [r["speedup"] for r in rs], color="tab:green")
    ax.axvline(1.0, color="k", lw=1)
    ax.axvline(2.0, color="tab:red", ls="--", lw=1, label="target 2x")
    ax.set_yticks(range(len(rs)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up of the fast path over its reference (forward + backward)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def implementation_rank(name: str) -> int:
    """Order of the contenders in the comparison tables and charts: this project's plain run, its
    variants, then the peer."""
    ranks = {
        "din_torchrec": 0,
        "din_torchrec+compile": 1,
        "din_torchrec+bf16": 2,
        "din_torchrec+bf16+compile": 3,
    }
    return ranks.get(name, 4 if name.startswith("din_torchrec") else 9)


def plot_compare(report: dict[str, Any], path: str | Path) -> None:
    """Samples/s and AUC of this project's models against DeepCTR-Torch's, side by side."""
    plt = _plt()
    rs = sorted(report["results"], key=lambda r: (r["model"], implementation_rank(r["implementation"])))
    labels = [f"{r['model']}\n{r['implementation'].replace('din_torchrec', 'ours')}" for r in rs]
    colors = ["tab:orange" if r["implementation"] == "deepctr_torch" else "tab:blue" for r in rs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    a1.bar(range(len(rs)), [r.get("train_samples_per_s") or 0.0 for r in rs], color=colors)
    a1.set_ylabel("training samples/s")
    a2.bar(range(len(rs)), [r.get("auc") or 0.0 for r in rs], color=colors)
    a2.set_ylim(0.5, 1.0)
    a2.set_ylabel("test AUC")
    for ax in (a1, a2):
        ax.set_xticks(range(len(rs)))
        ax.set_xticklabels(labels, fontsize=7)
    fig.suptitle(
        "ours (blue) vs DeepCTR-Torch (orange): same data, dims, history, hidden sizes, batch, epochs"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_prefetch(report: dict[str, Any], path: str | Path) -> None:
    plt = _plt()
    rs = report["results"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([r["name"] for r in rs], [r["samples_per_s"] for r in rs])
    ax.set_ylabel("training samples/s (reader + step)")
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("background-thread prefetch of the next batch")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
