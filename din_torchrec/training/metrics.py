"""Evaluation metrics: AUC, gAUC (DIN paper's impression-weighted user AUC), logloss and NE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchrec.metrics.ne import compute_cross_entropy, compute_ne

_ETA = 1e-12


def auc(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Global ROC AUC, tied scores counting one half (Mann-Whitney).

    Not TorchRec's ``compute_auc``: it orders tied predictions arbitrarily, so with ties (quantized or
    saturated outputs) its value depends on the input order (seen: 0.657 vs the exact 0.655).

    Args:
        predictions: ``[N]`` probabilities (or any monotone score).
        labels: ``[N]`` 0/1.
    """
    return group_auc(predictions, labels, torch.zeros_like(labels, dtype=torch.long))[0]


def group_auc(predictions: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> tuple[float, int]:
    """gAUC of the DIN paper: ``sum_u n_u AUC_u / sum_u n_u`` over users u with both classes.

    n_u is the user's number of impressions. Written here because TorchRec's per-group AUC loops over groups
    in Python (slow for 10^5 users) and averages groups without the impression weights the paper uses.
    Vectorised: one sort by (group, score); ties in score get the average rank.

    Args:
        predictions, labels, groups: ``[N]`` each.

    Returns:
        ``(gauc, number of users that counted)``; NaN when no user has both classes.
    """
    if labels.numel() == 0:
        return float("nan"), 0
    p = predictions.double()
    y = labels.double()
    _, g = torch.unique(groups, return_inverse=True)
    num_groups = int(g.max()) + 1
    # Sort by group then score: lexsort via two stable sorts.
    order = torch.argsort(p, stable=True)
    order = order[torch.argsort(g[order], stable=True)]
    gs, ps, ys = g[order], p[order], y[order]
    n = gs.numel()
    # Average ranks of tied scores within a group: tie blocks are runs of equal (group, score).
    new_block = torch.ones(n, dtype=torch.bool)
    new_block[1:] = (gs[1:] != gs[:-1]) | (ps[1:] != ps[:-1])
    block = torch.cumsum(new_block.long(), 0) - 1
    pos = torch.arange(n, dtype=torch.float64)
    group_start = torch.zeros(num_groups, dtype=torch.float64).scatter_reduce(
        0, gs, pos, reduce="amin", include_self=False
    )
    block_sum = torch.zeros(int(block[-1]) + 1, dtype=torch.float64).index_add(0, block, pos)
    block_cnt = torch.zeros(int(block[-1]) + 1, dtype=torch.float64).index_add(
        0, block, torch.ones(n, dtype=torch.float64)
    )
    rank = block_sum[block] / block_cnt[block] - group_start[gs] + 1.0  # 1-based rank within the group
    n_pos = torch.zeros(num_groups, dtype=torch.float64).index_add(0, gs, ys)
    n_all = torch.zeros(num_groups, dtype=torch.float64).index_add(0, gs, torch.ones(n, dtype=torch.float64))
    n_neg = n_all - n_pos
    rank_sum_pos = torch.zeros(num_groups, dtype=torch.float64).index_add(0, gs, rank * ys)
    ok = (n_pos > 0) & (n_neg > 0)
    if not bool(ok.any()):
        return float("nan"), 0
    auc_u = (rank_sum_pos[ok] - n_pos[ok] * (n_pos[ok] + 1) / 2) / (n_pos[ok] * n_neg[ok])
    weights = n_all[ok]
    return float((auc_u * weights).sum() / weights.sum()), int(ok.sum())


def logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean binary cross-entropy in nats (the papers' logloss)."""
    if labels.numel() == 0:
        return float("nan")
    return float(F.binary_cross_entropy_with_logits(logits.double(), labels.double()))


def normalized_entropy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """NE (TorchRec's formula): cross-entropy divided by the entropy of the base click rate."""
    y = labels.double()
    w = torch.ones_like(y)
    ce = compute_cross_entropy(y, predictions.double(), w, _ETA).sum()
    pos = y.sum()
    return float(compute_ne(ce, w.sum(), pos, w.sum() - pos, _ETA))


def ctr_metrics(logits: torch.Tensor, labels: torch.Tensor, users: torch.Tensor) -> dict[str, float]:
    """All evaluation metrics for one set of predictions.

    Args:
        logits: ``[N]``; labels: ``[N]`` 0/1; users: ``[N]`` grouping key for gAUC.
    """
    probs = torch.sigmoid(logits.double())
    gauc, users_counted = group_auc(probs, labels, users)
    return {
        "auc": auc(probs, labels),
        "gauc": gauc,
        "logloss": logloss(logits, labels),
        "ne": normalized_entropy(probs, labels),
        "ctr": float(labels.double().mean()) if labels.numel() else float("nan"),
        "predicted_ctr": float(probs.mean()) if probs.numel() else float("nan"),
        "samples": int(labels.numel()),
        "gauc_users": users_counted,
    }
