"""Training-curve pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from din_torchrec.utils.io import atomic_write_with  # noqa: E402


def plot_training_curve(history: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Train loss per logged step (left) and evaluation AUC / gAUC per epoch (right), as a PNG.

    Args:
        history: ``{"steps": [...], "loss": [...], "epochs": [{"epoch": e, "auc": .., "gauc": ..}, ...]}``.
    """
    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(history["steps"], history["loss"], lw=1, color="tab:blue")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("train loss (BCE + aux + reg)")
    ax_loss.grid(alpha=0.3)
    epochs = [e["epoch"] + 1 for e in history["epochs"]]
    for key, color in (("auc", "tab:green"), ("gauc", "tab:orange")):
        values = [e.get(key, float("nan")) for e in history["epochs"]]
        ax_auc.plot(epochs, values, marker="o", label=key, color=color)
    ax_auc.set_xlabel("epoch")
    ax_auc.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_auc.set_ylabel("evaluation")
    ax_auc.legend()
    ax_auc.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"), suffix=".png")
    plt.close(fig)
    return out
