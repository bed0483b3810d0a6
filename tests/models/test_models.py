"""Every model end to end on random batches: shapes, gradients, and independence from batch neighbours."""

from __future__ import annotations

import pytest
import torch

from din_torchrec.config import ExperimentConfig, ProfileTableConfig, SequenceTableConfig
from din_torchrec.data.batch import slice_batch
from din_torchrec.data.random_batch import random_batch
from din_torchrec.models import build_model

MODELS = ["base", "din", "dien", "dsin"]


def _config(name: str) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.features.embedding_dim = 8
    cfg.features.sequence = [
        SequenceTableConfig("item", 500, "target_item_id", "hist_item_ids"),
        SequenceTableConfig("category", 30, "target_cate_id", "hist_cate_ids"),
    ]
    cfg.features.profile = [ProfileTableConfig("user", 50, "user_id")]
    cfg.model.name = name  # type: ignore[assignment]
    cfg.model.attention_hidden = [16, 8]
    cfg.model.mlp_hidden = [32, 16]
    cfg.model.dsin.heads = 2
    cfg.model.dsin.max_sessions = 4
    cfg.model.dsin.max_session_length = 6
    cfg.model.dsin.lstm_hidden = 8
    cfg.model.dsin.session_gap_seconds = 900
    return cfg.validate()


def _batch(cfg: ExperimentConfig, b: int, seed: int, lengths: torch.Tensor | None = None):
    return random_batch(
        cfg.features,
        b,
        20,
        torch.Generator().manual_seed(seed),
        lengths=lengths,
        with_negatives=cfg.model.name == "dien",
    )


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_shapes(name: str) -> None:
    torch.manual_seed(0)
    cfg = _config(name)
    model = build_model(cfg)
    batch = _batch(cfg, 12, 1, lengths=torch.tensor([0, 1, 2, 5, 20, 3, 7, 1, 0, 9, 11, 4]))
    out = model(batch)
    assert out.logits.shape == (12,)
    assert torch.isfinite(out.logits).all()
    loss = out.logits.sum() + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "embeddings" not in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads), "a dense parameter got no gradient"
    n = int(batch.hist_lengths.sum())
    if name in ("din", "dien"):
        assert out.attention.shape == (n,)
    if name == "dsin":
        assert out.attention.shape == (12, cfg.model.dsin.max_sessions)
    if name == "dien":
        assert out.aux_loss is not None and out.aux_loss.ndim == 0 and float(out.aux_loss.detach()) > 0
        model.eval()
        assert model(batch).aux_loss is None, "the auxiliary loss is a training-only term"


@pytest.mark.parametrize("name", MODELS)
def test_a_sample_scores_the_same_alone_and_beside_longer_histories(name: str) -> None:
    """No padding leaks: in eval mode a sample's logit does not depend on the other samples of the batch
    (whose longer histories would pad a dense layout)."""
    torch.manual_seed(0)
    cfg = _config(name)
    model = build_model(cfg).eval()
    batch = _batch(cfg, 6, 2, lengths=torch.tensor([3, 20, 1, 17, 0, 8]))
    with torch.no_grad():
        together = model(batch).logits
        for i in range(6):
            alone = model(slice_batch(batch, i, i + 1)).logits
            torch.testing.assert_close(alone, together[i : i + 1], rtol=1e-5, atol=1e-5)


def test_dien_auxiliary_weight_zero_needs_no_negatives() -> None:
    cfg = _config("dien")
    cfg.model.dien.aux_loss_weight = 0.0
    model = build_model(cfg)
    out = model(random_batch(cfg.features, 4, 6, torch.Generator().manual_seed(0)))
    assert out.aux_loss is None
