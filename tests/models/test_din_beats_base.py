"""Quality: DIN beats the sum-pooling base model on data whose clicks depend on the relevant behaviours.

The generator plants clicks that depend on the behaviour most similar to the candidate; sum pooling blurs
that behaviour with the rest of the history, target attention can single it out.
"""

import pytest

from din_torchrec.training.trainer import train
from tests.conftest import small_experiment

# Measured on this dataset (seed 3, 2 epochs, one process): base AUC 0.6780, DIN AUC 0.7592 (+0.081).
MIN_AUC_MARGIN = 0.04


@pytest.mark.slow
def test_din_beats_base_by_a_clear_auc_margin(small_dataset, tmp_path) -> None:
    base = train(small_experiment(small_dataset, tmp_path / "base", "base"))
    din = train(small_experiment(small_dataset, tmp_path / "din", "din"))
    b, d = base["final"], din["final"]
    assert d["auc"] - b["auc"] >= MIN_AUC_MARGIN, f"DIN AUC {d['auc']:.4f} vs base {b['auc']:.4f}"
    assert d["gauc"] > b["gauc"], f"DIN gAUC {d['gauc']:.4f} vs base {b['gauc']:.4f}"
    assert d["logloss"] < b["logloss"]
    # Both learned something real (AUC 0.5 is chance).
    assert b["auc"] > 0.6
