"""Click losses: binary cross-entropy, focal loss, label smoothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def smooth_labels(labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``y (1 - eps) + eps / K`` with K = 2 classes: 1 -> 1 - eps/2, 0 -> eps/2."""
    if smoothing == 0:
        return labels
    return labels * (1.0 - smoothing) + smoothing / 2.0


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    """Per-sample focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` (Lin et al.), from logits.

    ``alpha_t = alpha`` for clicks and ``1 - alpha`` for non-clicks; soft targets interpolate both.
    ``log p_t`` comes from ``binary_cross_entropy_with_logits`` for stability.

    Shapes: ``logits, targets: [B] -> [B]``.
    """
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return alpha_t * (1 - p_t).pow(gamma) * ce


def click_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None = None,
    kind: str = "bce",
    focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Weighted mean click loss over the batch.

    Args:
        logits: ``[B]``; labels: ``[B]`` 0/1; weights: ``[B]`` per-sample weights (0 drops a padding row).
        kind: ``bce`` or ``focal``.
        label_smoothing: eps of :func:`smooth_labels`, applied before either loss.
    """
    logits = logits.float()
    targets = smooth_labels(labels.float(), label_smoothing)
    if kind == "bce":
        per_sample = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    elif kind == "focal":
        per_sample = focal_loss(logits, targets, focal_alpha, focal_gamma)
    else:
        raise ValueError(f"training.loss: expected 'bce' or 'focal', got {kind!r}")
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights).sum() / weights.sum().clamp_min(1.0)
