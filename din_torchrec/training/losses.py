"""The click loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def click_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None, kind: str = "bce"
) -> torch.Tensor:
    """Mean binary cross-entropy over the batch.

    Args:
        logits: ``[B]``; labels: ``[B]`` 0/1; weights: ``[B]`` per-sample weights (0 drops a padding row).
    """
    if kind != "bce":
        raise ValueError(f"training.loss: expected 'bce', got {kind!r}")
    per_sample = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)
