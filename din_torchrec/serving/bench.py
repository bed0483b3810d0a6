"""Serving latency: rank N candidates for one user, against scoring them one by one.

``python -m din_torchrec.serving.bench [--run DIR | --config FILE] [--model din] [--candidates 1000]
[--history 50]`` prints JSON. Without a run the model is the config's (default: the demo config's sizes) with
random weights: latency does not depend on the weights.

Measured, each as p50 / p99 over ``repeats`` calls, on the current thread settings:

* ``rank_cold_ms``: ``Predictor.rank`` of N candidates, user state recomputed (cache cleared each call);
* ``rank_warm_ms``: the same with the user state from the cache;
* ``model_batch_ms``: the training model's ``forward`` on one batch of N samples, each carrying the whole
  history (what a server without the user/candidate split runs);
* ``one_by_one_predictor_ms`` / ``one_by_one_model_ms``: total time for N calls of one candidate each
  (``Predictor.rank`` with a warm cache / ``model(batch)`` with a batch of one sample);
* speed-ups of ``rank_cold`` p50 over each baseline.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from din_torchrec.config import ExperimentConfig, load_config
from din_torchrec.models import build_model
from din_torchrec.serving.predictor import Predictor, batch_for_candidates


def random_request(cfg: ExperimentConfig, num_candidates: int, history: int, seed: int = 0) -> dict[str, Any]:
    """A valid request with random ids, a ``history``-behaviour history (10-minute to 2-hour gaps) and
    ``num_candidates`` candidates."""
    rng = np.random.default_rng(seed)
    f = cfg.features
    hist = {t.name: rng.integers(1, t.num_embeddings, history).tolist() for t in f.sequence}
    hist["timestamps"] = (1_700_000_000 + np.cumsum(rng.integers(600, 7200, history))).tolist()
    cands = {t.name: rng.integers(1, t.num_embeddings, num_candidates).tolist() for t in f.sequence}
    profile = {
        p.column: int(rng.integers(0, p.num_embeddings)) for p in f.profile if p.column != f.user_column
    }
    user = int(
        rng.integers(0, next((p.num_embeddings for p in f.profile if p.column == f.user_column), 1000))
    )
    return {"user_id": user, "profile": profile, "history": hist, "candidates": cands}


def _percentiles(times: list[float]) -> dict[str, float]:
    a = np.asarray(times) * 1000.0
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean())}


def latency_benchmark(
    predictor: Predictor,
    num_candidates: int = 1000,
    history: int = 50,
    repeats: int = 30,
    one_by_one: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """The figures of the module docstring for ``predictor``."""
    cfg = predictor.cfg
    if history > predictor.policy.max_history:
        raise ValueError(
            f"history {history} exceeds the predictor's max_history {predictor.policy.max_history}"
        )
    body = random_request(cfg, num_candidates, history, seed)
    prepared = predictor.prepare(body)
    one = [
        predictor.prepare({**body, "candidates": {k: v[i : i + 1] for k, v in body["candidates"].items()}})
        for i in range(num_candidates)
    ]
    model = predictor.model
    batch = batch_for_candidates(prepared, cfg, with_negatives=model.uses_negatives)

    def timed(fn, n: int) -> list[float]:
        fn()  # warm-up
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out

    def cold() -> None:
        predictor.clear_cache()
        predictor.rank_prepared([prepared])

    with torch.inference_mode():
        result: dict[str, Any] = {
            "model": cfg.model.name,
            "candidates": num_candidates,
            "history": history,
            "threads": torch.get_num_threads(),
            "quantization": predictor.quantization,
            "rank_cold_ms": _percentiles(timed(cold, repeats)),
            "rank_warm_ms": _percentiles(timed(lambda: predictor.rank_prepared([prepared]), repeats)),
            "model_batch_ms": _percentiles(timed(lambda: model(batch), max(3, repeats // 3))),
        }
        cold_p50 = result["rank_cold_ms"]["p50"]
        result["speedup_vs_model_batch"] = result["model_batch_ms"]["p50"] / cold_p50
        if one_by_one:
            predictor.rank_prepared([one[0]])
            t0 = time.perf_counter()
            for p in one:
                predictor.rank_prepared([p])
            result["one_by_one_predictor_ms"] = (time.perf_counter() - t0) * 1000.0
            singles = [batch_for_candidates(p, cfg, with_negatives=model.uses_negatives) for p in one]
            model(singles[0])
            t0 = time.perf_counter()
            for b in singles:
                model(b)
            result["one_by_one_model_ms"] = (time.perf_counter() - t0) * 1000.0
            result["speedup_vs_one_by_one_predictor"] = result["one_by_one_predictor_ms"] / cold_p50
            result["speedup_vs_one_by_one_model"] = result["one_by_one_model_ms"] / cold_p50
    predictor.clear_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m din_torchrec.serving.bench", description=__doc__)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--run", help="trainer output folder (trained weights); default: random weights")
    p.add_argument("--model", help="model.name override (din, dien, dsin, base)")
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quantize", choices=["int8", "int4", "fp16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--no-one-by-one", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.run:
        pred = Predictor.from_checkpoint(args.run, quantize=args.quantize)
    else:
        cfg = load_config(args.config, [f"model.name={args.model}"] if args.model else [])
        torch.manual_seed(0)
        pred = Predictor(build_model(cfg), cfg, quantize=args.quantize)
    res = latency_benchmark(pred, args.candidates, args.history, args.repeats, not args.no_one_by_one)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
