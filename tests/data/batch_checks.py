"""Batch comparisons shared by the reader tests."""

from __future__ import annotations

import torch

from din_torchrec.data.batch import Batch


def assert_same_batch(a: Batch, b: Batch, where: str) -> None:
    for kjt in ("sequence_features", "profile_features"):
        x, y = getattr(a, kjt), getattr(b, kjt)
        assert x.keys() == y.keys(), f"{where}: {kjt} keys"
        assert torch.equal(x.values(), y.values()), f"{where}: {kjt} values"
        assert torch.equal(x.lengths(), y.lengths()), f"{where}: {kjt} lengths"
    for f in ("labels", "user_ids", "hist_timestamps", "hist_lengths", "target_timestamps", "valid"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f"{where}: {f}"
    assert a.reg_weights.keys() == b.reg_weights.keys(), f"{where}: reg_weights keys"
    for k in a.reg_weights:
        assert torch.equal(a.reg_weights[k], b.reg_weights[k]), f"{where}: reg_weights[{k}]"
