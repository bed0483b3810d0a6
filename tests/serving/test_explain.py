"""Explain: the weights the model used, normalised where softmax is used, as JSON, PNG and CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from din_torchrec.serving.cli import register
from din_torchrec.serving.predictor import Predictor, batch_for_candidates
from tests.serving.conftest import MAX_HISTORY, random_model, tiny_config
from tests.serving.test_predictor import _request

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CASES = {
    "din": ("din", {}),
    "din_softmax": ("din", {"attention_normalization": "softmax"}),
    "dien": ("dien", {}),
    "dsin": ("dsin", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_explain_weights_are_the_models(case: str, tmp_path: Path) -> None:
    name, overrides = CASES[case]
    cfg = tiny_config(name, **overrides)
    model = random_model(cfg)
    pred = Predictor(model, cfg)
    body = _request(cfg, 6, MAX_HISTORY + 3, seed=4)  # over-long: explained on the kept part
    exp = pred.explain(body["user_id"], body["history"], body["candidates"], profile=body["profile"])
    prepared = pred.prepare(body)
    batch = batch_for_candidates(prepared, cfg, model.uses_negatives)
    with torch.no_grad():
        out = model(batch)
    n, t = prepared.num_candidates, prepared.history_length
    assert exp.truncated == 3 and len(exp.timestamps) == t == MAX_HISTORY
    np.testing.assert_allclose(exp.scores, torch.sigmoid(out.logits).numpy(), rtol=1e-5, atol=1e-6)

    if name in ("din", "dien"):
        key = "history" if name == "din" else "evolution"
        weights = exp.attention[key]
        assert weights.shape == (n, t)
        np.testing.assert_allclose(weights, out.attention.view(n, t).numpy(), rtol=1e-5, atol=1e-6)
        if exp.normalization[key] == "softmax":
            np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)
        else:
            assert not np.allclose(weights.sum(1), 1.0)  # DIN's raw weights carry the interest intensity
    else:
        a_i, a_h = exp.attention["sessions"], exp.attention["session_states"]
        np.testing.assert_allclose(a_i, out.attention.numpy(), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            emb = model.embed(batch)
            detail = model.interaction.forward_detailed(
                emb.behaviours, emb.timestamps, emb.lengths, emb.candidates
            )
        np.testing.assert_allclose(a_h, detail.state_attention.numpy(), rtol=1e-5, atol=1e-6)
        kept = detail.session_mask[0].numpy()
        assert 1 < kept.sum() <= cfg.model.dsin.max_sessions
        np.testing.assert_allclose(a_i[:, kept].sum(1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(a_h[:, kept].sum(1), 1.0, rtol=1e-5)
        assert (a_i[:, ~kept] == 0).all()
        slots = exp.session_of_position
        assert slots.shape == (t,) and set(slots[slots >= 0]) == set(np.flatnonzero(kept))
        per_pos = exp.per_position("sessions")
        np.testing.assert_allclose(per_pos[:, slots >= 0], a_i[:, slots[slots >= 0]])
        assert np.isnan(per_pos[:, slots < 0]).all()

    js = json.loads(exp.save_json(tmp_path / "e.json").read_text())
    assert js["history"]["item"] == prepared.history[0].tolist() and len(js["scores"]) == n
    assert exp.plot(tmp_path / "e.png").read_bytes()[:8] == PNG_MAGIC


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="din-torchrec")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_explain_command(trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        _cli(
            [
                "explain",
                "--run",
                str(trained_run),
                "--sample",
                "3",
                "--num-candidates",
                "6",
                "-o",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    data = json.loads((tmp_path / "a" / "explain.json").read_text())
    assert printed["model"] == "din" and data["model"] == "din"
    weights = np.asarray(data["attention"]["history"])
    assert weights.shape == (len(data["scores"]), len(data["history"]["item"]))
    assert (tmp_path / "a" / "explain.png").read_bytes()[:8] == PNG_MAGIC

    request = {
        "user_id": 5,
        "profile": {"user_age": 1, "user_gender": 0},
        "history": {"item": [3, 4, 5], "category": [1, 1, 2], "timestamps": [10, 20, 30]},
        "candidates": {"item": [7, 8], "category": [2, 3]},
    }
    (tmp_path / "req.json").write_text(json.dumps(request))
    assert (
        _cli(
            [
                "explain",
                "--run",
                str(trained_run),
                "--request",
                str(tmp_path / "req.json"),
                "-o",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    data = json.loads((tmp_path / "b" / "explain.json").read_text())
    pred = Predictor.from_checkpoint(trained_run)
    ranking = pred.rank(
        5, request["history"], request["candidates"], profile=request["profile"], attention=True
    )
    np.testing.assert_allclose(data["attention"]["history"], ranking.attention["history"], rtol=1e-6)

    request["candidates"]["item"][0] = 10**6
    (tmp_path / "bad.json").write_text(json.dumps(request))
    assert _cli(["explain", "--run", str(trained_run), "--request", str(tmp_path / "bad.json")]) == 2
    assert "not in table 'item'" in capsys.readouterr().err
