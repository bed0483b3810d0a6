"""AUC / gAUC / logloss against independent NumPy references."""

import numpy as np
import pytest
import torch

from din_torchrec.training.metrics import auc, ctr_metrics, group_auc, logloss


def _auc_pairs(p: np.ndarray, y: np.ndarray) -> float:
    """AUC as the fraction of (positive, negative) pairs ranked right, ties counting one half."""
    pos, neg = p[y == 1], p[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


def test_auc_matches_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(0)
    p = rng.integers(0, 5, 300).astype(np.float64) / 4  # many ties
    y = (rng.random(300) < 0.3 + 0.4 * p).astype(np.float64)
    assert auc(torch.tensor(p), torch.tensor(y)) == pytest.approx(_auc_pairs(p, y), abs=1e-6)


def test_gauc_is_impression_weighted_user_auc() -> None:
    rng = np.random.default_rng(1)
    n = 2000
    users = rng.integers(0, 60, n)
    p = np.round(rng.random(n), 2)
    y = (rng.random(n) < p).astype(np.float64)
    num, den, counted = 0.0, 0.0, 0
    for u in np.unique(users):
        m = users == u
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * _auc_pairs(p[m], y[m])
            den += m.sum()
            counted += 1
    g, k = group_auc(torch.tensor(p), torch.tensor(y), torch.tensor(users))
    assert k == counted
    assert g == pytest.approx(num / den, abs=1e-9)


def test_gauc_skips_single_class_users_and_logloss_formula() -> None:
    p = torch.tensor([0.9, 0.1, 0.8, 0.3])
    y = torch.tensor([1.0, 0.0, 1.0, 1.0])
    users = torch.tensor([0, 0, 1, 1])  # user 1 has only clicks
    g, k = group_auc(p, y, users)
    assert (g, k) == (1.0, 1)
    logits = torch.tensor([2.0, -1.0, 0.5])
    labels = torch.tensor([1.0, 0.0, 0.0])
    expected = -np.mean(
        [
            np.log(1 / (1 + np.exp(-2.0))),
            np.log(1 - 1 / (1 + np.exp(1.0))),
            np.log(1 - 1 / (1 + np.exp(-0.5))),
        ]
    )
    assert logloss(logits, labels) == pytest.approx(expected)
    m = ctr_metrics(logits, labels, torch.tensor([0, 0, 1]))
    assert m["samples"] == 3 and m["ne"] > 0
