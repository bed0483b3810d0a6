"""The paper-style comparison: several models trained on one dataset under the same settings and seeds."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from din_torchrec.config import ExperimentConfig  # noqa: E402
from din_torchrec.training.trainer import train  # noqa: E402
from din_torchrec.utils.io import atomic_write_json, atomic_write_text, atomic_write_with  # noqa: E402

DEFAULT_MODELS = ("base", "din", "dien", "dsin")


def rela_impr(auc: float, base_auc: float) -> float:
    """RelaImpr of the DIN paper, in percent: ``((AUC - 0.5) / (AUC_base - 0.5) - 1) * 100``."""
    if not math.isfinite(auc) or not math.isfinite(base_auc) or base_auc == 0.5:
        return float("nan")
    return ((auc - 0.5) / (base_auc - 0.5) - 1.0) * 100.0


def markdown_table(rows: list[dict[str, Any]], baseline: str) -> str:
    """The comparison as a markdown table, one row per model."""
    lines = [
        f"| model | AUC | gAUC | logloss | RelaImpr vs {baseline} (AUC) | train samples/s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['auc']:.4f} | {r['gauc']:.4f} | {r['logloss']:.4f} | "
            f"{r['rela_impr_percent']:+.2f}% | {r['train_samples_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot_validation_curves(results: dict[str, dict[str, Any]], path: str | Path, title: str) -> Path:
    """Validation AUC and logloss per epoch for every model, side by side."""
    fig, (ax_auc, ax_ll) = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in results.items():
        epochs = [e["epoch"] + 1 for e in res["epochs"]]
        ax_auc.plot(epochs, [e["auc"] for e in res["epochs"]], marker="o", label=name)
        ax_ll.plot(epochs, [e["logloss"] for e in res["epochs"]], marker="o", label=name)
    for ax, label in ((ax_auc, "validation AUC"), (ax_ll, "validation logloss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    fig.tight_layout()
    out = atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), suffix=".png")
    plt.close(fig)
    return out


def run_report(
    cfg: ExperimentConfig, out_dir: str | Path, models: tuple[str, ...] = DEFAULT_MODELS, title: str = ""
) -> dict[str, Any]:
    """Train every model of ``models`` on ``cfg``'s dataset with ``cfg``'s settings and seed; write
    ``report.md`` (the table), ``report.json`` and ``validation_curves.png`` into ``out_dir``.

    The first model is the baseline of RelaImpr (``base`` by default, as in the DIN paper).
    """
    out = Path(out_dir)
    results: dict[str, dict[str, Any]] = {}
    for name in models:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.model.name = name  # type: ignore[assignment]
        run_cfg.training.output_dir = str(out / name)
        run_cfg.validate()
        results[name] = train(run_cfg)
    baseline = models[0]
    base_auc = results[baseline]["final"]["auc"]
    rows = []
    for name in models:
        res = results[name]
        final = res["final"]
        rows.append(
            {
                "model": name,
                "auc": final["auc"],
                "gauc": final["gauc"],
                "logloss": final["logloss"],
                "rela_impr_percent": rela_impr(final["auc"], base_auc),
                "train_samples_per_s": res["train_samples_per_s"],
                "peak_rss_mb": res["peak_rss_mb"],
                "epochs": len(res["epochs"]),
            }
        )
    heading = title or f"Comparison on {cfg.data.dir}"
    table = markdown_table(rows, baseline)
    text = (
        f"# {heading}\n\n"
        f"Same data, settings and seed ({cfg.training.seed}) for every model; {cfg.training.epochs} epoch(s), "
        f"batch {cfg.data.batch_size}, embedding dim {cfg.features.embedding_dim}, max history "
        f"{cfg.data.max_history}. Metrics on `{cfg.data.eval_path}` after the last epoch; samples/s measured "
        f"in this run, one model after the other on the same machine.\n\n{table}\n"
        "![validation curves](validation_curves.png)\n"
    )
    atomic_write_text(out / "report.md", text)
    atomic_write_json(out / "report.json", {"rows": rows, "baseline": baseline})
    plot_validation_curves(results, out / "validation_curves.png", heading)
    return {"rows": rows, "table": table, "out_dir": str(out)}
