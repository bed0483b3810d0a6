"""int8 / int4 embedding tables: smaller, and the AUC barely moves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from din_torchrec.serving.predictor import Predictor, load_model, resolve_run
from din_torchrec.serving.quantize import embedding_memory, quantization_report, quantize_model
from tests.serving.test_predictor import _request


def test_quantized_tables_are_smaller_and_keep_the_auc(trained_run: Path) -> None:
    ckpt, cfg = resolve_run(trained_run)
    model, _ = load_model(ckpt, cfg)
    report = quantization_report(model, cfg, dtypes=("int8", "int4"))
    fp32 = report["fp32"]
    assert report["samples"] == 4000
    assert 0.55 < fp32["auc"] < 1.0
    int8, int4 = report["int8"], report["int4"]
    # Rows of 16 fp32 (64 B) become 16 int8 + fp16 scale/bias, aligned (32 B), or 16 int4 + scale/bias (16 B).
    assert int8["embedding_bytes"] < 0.55 * fp32["embedding_bytes"]
    assert int4["embedding_bytes"] < 0.3 * fp32["embedding_bytes"]
    assert int8["memory_saved_bytes"] == fp32["embedding_bytes"] - int8["embedding_bytes"]
    assert abs(int8["auc_change"]) < 2e-3
    assert abs(int4["auc_change"]) < 1e-2
    assert abs(int8["logloss_change"]) < 2e-3

    # The predictor serves from the quantized tables; scores stay close to fp32.
    body = _request(cfg, 20, 10)
    exact = Predictor(model, cfg).rank_many([body])[0]
    q8 = Predictor(model, cfg, quantize="int8")
    assert embedding_memory(q8.model)["total"] == int8["embedding_bytes"]
    r8 = q8.rank_many([body])[0]
    r4 = Predictor(model, cfg, quantize="int4").rank_many([body])[0]
    assert np.abs(r8.scores - exact.scores).max() < 5e-3
    assert np.abs(r4.scores - exact.scores).max() < 3e-2
    assert not np.array_equal(r8.logits, exact.logits)
    # Quantizing copies: the fp32 model is untouched.
    assert embedding_memory(model)["total"] == fp32["embedding_bytes"]
    assert quantize_model(model, {"item": "int4"}) is not model
