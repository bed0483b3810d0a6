"""The Predictor scores what the training model scores, batched, cached and validated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from din_torchrec.data.random_batch import random_batch
from din_torchrec.distributed.env import DistEnv
from din_torchrec.serving.predictor import (
    Predictor,
    RequestError,
    ServingPolicy,
    batch_for_candidates,
    requests_from_batch,
)
from din_torchrec.training.metrics import ctr_metrics
from tests.serving.conftest import MAX_HISTORY, random_model, tiny_config

CASES = {
    "din": {},
    "din_softmax_prelu": {"attention_normalization": "softmax", "attention_activation": "prelu"},
    "dien_augru": {},
    "dien_agru_no_aux": {"dien__evolution": "agru", "dien__aux_loss_weight": 0.0},
    "dien_aigru": {"dien__evolution": "aigru"},
    "dsin": {},
    "dsin_bilinear": {"attention_hidden": []},
    "base": {},
}


def _model_name(case: str) -> str:
    return case.split("_")[0]


def _request(cfg, n_cands: int, t: int, seed: int = 0, user: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    f = cfg.features
    hist = {tab.name: rng.integers(1, tab.num_embeddings, t).tolist() for tab in f.sequence}
    # Gaps around DSIN's 1800 s threshold: several sessions, some longer than a session's cap.
    hist["timestamps"] = (1_700_000_000 + np.cumsum(rng.choice([60, 600, 4000], t))).tolist()
    cands = {tab.name: rng.integers(1, tab.num_embeddings, n_cands).tolist() for tab in f.sequence}
    return {
        "user_id": user,
        "profile": {"user_age": 3, "user_gender": 1},
        "history": hist,
        "candidates": cands,
    }


@pytest.mark.parametrize("case", list(CASES))
def test_scores_equal_the_training_model(case: str) -> None:
    cfg = tiny_config(_model_name(case), **CASES[case])
    model = random_model(cfg)
    gen = torch.Generator().manual_seed(1)
    batch = random_batch(cfg.features, 24, MAX_HISTORY, gen, with_negatives=model.uses_negatives)
    with torch.no_grad():
        expected = model(batch).logits.double().numpy()
    pred = Predictor(model, cfg)
    rankings = pred.rank_many(requests_from_batch(batch, cfg))
    got = np.concatenate([r.logits for r in rankings])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert (batch.hist_lengths == 0).any(), "empty histories are part of the check"

    # N candidates in one call == N single-candidate calls == the model on N samples.
    body = _request(cfg, 9, MAX_HISTORY, seed=3)
    many = pred.rank(body["user_id"], body["history"], body["candidates"], profile=body["profile"])
    singles = [
        pred.rank(
            body["user_id"],
            body["history"],
            {k: v[i : i + 1] for k, v in body["candidates"].items()},
            profile=body["profile"],
        ).logits[0]
        for i in range(9)
    ]
    np.testing.assert_allclose(many.logits, singles, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        direct = model(batch_for_candidates(pred.prepare(body), cfg, model.uses_negatives)).logits
    np.testing.assert_allclose(many.logits, direct.double().numpy(), rtol=1e-5, atol=1e-5)
    assert list(many.order) == list(np.argsort(-many.logits, kind="stable"))


@pytest.mark.parametrize("case", ["din", "dien_augru", "dsin"])
def test_rank_many_equals_separate_calls(case: str) -> None:
    cfg = tiny_config(_model_name(case), **CASES[case])
    pred = Predictor(random_model(cfg), cfg)
    bodies = [
        _request(cfg, n, t, seed=s, user=s) for s, (n, t) in enumerate([(5, 12), (1, 0), (7, 3), (2, 9)])
    ]
    bodies.append(dict(bodies[0]))  # the same user twice in one call
    together = pred.rank_many(bodies)
    pred.clear_cache()
    for body, r in zip(bodies, together):
        alone = pred.rank_many([body])[0]
        np.testing.assert_allclose(r.logits, alone.logits, rtol=1e-5, atol=1e-6)


def test_cache_hits_give_identical_scores_and_history_changes_invalidate() -> None:
    cfg = tiny_config("dien")
    pred = Predictor(random_model(cfg), cfg, cache_size=2)
    body = _request(cfg, 6, 10)
    first = pred.rank_many([body])[0]
    again = pred.rank_many([body])[0]
    assert not first.cache_hit and again.cache_hit
    assert np.array_equal(first.logits, again.logits)

    # A new behaviour changes the digest: recomputed, and the user's old entry is dropped.
    changed = json.loads(json.dumps(body))
    for k in changed["history"]:
        changed["history"][k] = changed["history"][k][1:] + changed["history"][k][-1:]
    changed["history"]["timestamps"][-1] += 60
    r = pred.rank_many([changed])[0]
    assert not r.cache_hit and not np.allclose(r.logits, first.logits)
    assert len(pred.cache) == 1
    fresh = Predictor(pred.model, cfg, cache_size=0).rank_many([changed])[0]
    np.testing.assert_allclose(r.logits, fresh.logits, rtol=1e-6)

    # A reused caller version with a different history is detected (stale) and recomputed.
    v1 = {**body, "history_version": 1}
    pred.rank_many([v1])
    v1_changed = {**changed, "history_version": 1}
    r2 = pred.rank_many([v1_changed])[0]
    assert not r2.cache_hit and pred.cache_info().stale == 1
    np.testing.assert_allclose(r2.logits, fresh.logits, rtol=1e-6)
    assert pred.rank_many([v1_changed])[0].cache_hit
    # The same version with two histories in one call: each request gets its own state.
    both = pred.rank_many([{**body, "history_version": 2}, {**changed, "history_version": 2}])
    np.testing.assert_allclose(both[0].logits, first.logits, rtol=1e-6)
    np.testing.assert_allclose(both[1].logits, fresh.logits, rtol=1e-6)

    # The profile is part of the user state.
    other_age = {**body, "profile": {"user_age": 5, "user_gender": 1}}
    assert not pred.rank_many([other_age])[0].cache_hit

    # LRU bound.
    for u in range(10, 15):
        pred.rank_many([_request(cfg, 2, 4, seed=u, user=u)])
    info = pred.cache_info()
    assert info.size == 2 and info.evictions >= 3


def test_validation() -> None:
    cfg = tiny_config("dsin")
    pred = Predictor(random_model(cfg), cfg, policy=ServingPolicy.for_config(cfg, max_candidates=20))
    good = _request(cfg, 3, 5)

    def status(body) -> int:
        with pytest.raises(RequestError) as e:
            pred.rank_many([body])
        return e.value.status

    item_size = cfg.features.sequence[0].num_embeddings
    bad_item = json.loads(json.dumps(good))
    bad_item["candidates"]["item"][1] = item_size
    assert status(bad_item) == 422
    neg = json.loads(json.dumps(good))
    neg["history"]["category"][0] = -1
    assert status(neg) == 422
    assert status({**good, "user_id": cfg.features.profile[0].num_embeddings + 5}) == 422
    too_many = _request(cfg, 21, 5)
    assert status(too_many) == 413
    wrong_type = json.loads(json.dumps(good))
    wrong_type["candidates"]["item"][0] = "12"
    assert status(wrong_type) == 400
    floats = json.loads(json.dumps(good))
    floats["history"]["item"][0] = 1.5
    assert status(floats) == 400
    uneven = json.loads(json.dumps(good))
    uneven["history"]["item"].append(3)
    assert status(uneven) == 400
    no_ts = json.loads(json.dumps(good))
    del no_ts["history"]["timestamps"]
    assert status(no_ts) == 400  # DSIN cuts sessions by time
    assert status({**good, "candidates": {"item": [], "category": []}}) == 400
    assert status({**good, "extra": 1}) == 400
    assert status({**good, "profile": {"user_age": 3}}) == 400
    assert status({**good, "user_id": True}) == 400

    # Over-long histories: truncated to the most recent max_history by default, refused by policy.
    long = _request(cfg, 3, MAX_HISTORY + 5)
    r = pred.rank_many([long])[0]
    assert r.truncated == 5
    recent = json.loads(json.dumps(long))
    for k in recent["history"]:
        recent["history"][k] = recent["history"][k][5:]
    np.testing.assert_allclose(r.logits, pred.rank_many([recent])[0].logits, rtol=1e-6)
    strict = Predictor(pred.model, cfg, policy=ServingPolicy.for_config(cfg, long_history="reject"))
    with pytest.raises(RequestError) as e:
        strict.rank_many([long])
    assert e.value.status == 413 and "max_history" in e.value.message
    lenient = Predictor(pred.model, cfg, policy=ServingPolicy.for_config(cfg, unknown_ids="zero"))
    as_zero = json.loads(json.dumps(good))
    as_zero["candidates"]["item"][1] = 0
    np.testing.assert_allclose(
        lenient.rank_many([bad_item])[0].logits, lenient.rank_many([as_zero])[0].logits, rtol=1e-6
    )


def test_checkpoint_written_by_the_trainer(trained_run: Path) -> None:
    """Loaded without a process group; the predictor's scores on the eval split reproduce the trainer's
    end-of-training metrics (same weights, same samples)."""
    from din_torchrec.training.trainer import make_reader

    assert not dist.is_initialized()
    pred = Predictor.from_checkpoint(trained_run, cache_size=0)
    assert not dist.is_initialized()
    metrics = json.loads((trained_run / "metrics.json").read_text())["final"]
    reader = make_reader(pred.cfg, DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo"), "eval", None)
    logits, labels, users = [], [], []
    for batch in reader:
        keep = batch.valid_mask() > 0
        rankings = pred.rank_many(requests_from_batch(batch, pred.cfg))
        logits.append(torch.tensor(np.concatenate([r.logits for r in rankings]))[keep])
        labels.append(batch.labels[keep])
        users.append(batch.user_ids[keep])
    got = ctr_metrics(torch.cat(logits), torch.cat(labels).double(), torch.cat(users))
    assert got["samples"] == metrics["samples"]
    for key in ("auc", "gauc", "logloss"):
        assert got[key] == pytest.approx(metrics[key], abs=1e-6), key
