"""``din-torchrec explain | serve | export``: the serving commands, added to the main CLI by :func:`register`.

The model comes from a trainer run: ``--run <output_dir>`` (its ``config.yaml`` and ``checkpoint/``), or
``--config FILE`` (the run is then ``training.output_dir``), with ``--set key=value`` overrides either way.

* ``explain``: attention weights for one user and their candidates -> ``explain.json`` and
  ``explain.png`` (heatmap, candidates x history positions). The request comes from ``--request FILE``
  (JSON, see :mod:`din_torchrec.serving.requests`) or ``--sample N``: row N of the eval split (its user,
  profile and history) with the targets of the next ``--num-candidates`` rows as candidates.
* ``serve``: the HTTP JSON service (:mod:`din_torchrec.serving.server`) on ``--host``/``--port``
  (127.0.0.1:8000 by default; ``--port 0`` picks a free port and prints it), until Ctrl-C or
  ``--duration`` seconds.
* ``export``: the ``torch.export`` artefact (:mod:`din_torchrec.serving.export`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from din_torchrec.config import ConfigError, ExperimentConfig, add_config_arguments, load_config


def _add_model_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, "experiment YAML (default: the run's config.yaml)")
    p.add_argument("--run", help="trainer output folder (default: training.output_dir of --config)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: <run>/checkpoint)")


def _resolve(args: argparse.Namespace) -> tuple[ExperimentConfig, Path]:
    if args.config:
        cfg = load_config(args.config, args.overrides)
        run = Path(args.run or cfg.training.output_dir)
    elif args.run:
        run = Path(args.run)
        cfg_path = run / "config.yaml"
        if not cfg_path.exists():
            raise ConfigError(f"{run}: no config.yaml in the run folder; pass --config")
        cfg = load_config(cfg_path, args.overrides)
    else:
        raise ConfigError("name the model with --run <output_dir> or --config FILE")
    return cfg, Path(args.checkpoint) if args.checkpoint else run / "checkpoint"


def _predictor(args: argparse.Namespace, **kwargs: Any):
    from din_torchrec.serving.predictor import Predictor, load_model

    cfg, ckpt = _resolve(args)
    model, _ = load_model(ckpt, cfg)
    return Predictor(model, cfg, **kwargs)


def _fail(message: str) -> int:
    print(f"din-torchrec: {message}", file=sys.stderr)
    return 2


def _sample_request(pred, index: int, num_candidates: int) -> dict[str, Any]:
    """Row ``index`` of the eval split (user, profile, history) with the targets of the following
    ``num_candidates - 1`` rows (its own target first) as candidates."""
    import torch

    from din_torchrec.distributed.env import DistEnv
    from din_torchrec.serving.predictor import requests_from_batch
    from din_torchrec.training.trainer import make_reader

    reader = make_reader(pred.cfg, DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo"), "eval", None)
    rows: list = []
    seen = 0
    for batch in reader:
        reqs = requests_from_batch(batch, pred.cfg)
        for r in reqs:
            if seen >= index:
                rows.append(r)
            seen += 1
            if len(rows) >= num_candidates:
                break
        if len(rows) >= num_candidates:
            break
    if not rows:
        raise ValueError(f"--sample {index}: the eval split has only {seen} rows")
    first = rows[0]
    names = [t.name for t in pred.features.sequence]
    cands: dict[str, list[int]] = {n: [] for n in names}
    seen_ids = set()
    for r in rows:
        key = tuple(int(r.candidates[n][0]) for n in names)
        if key in seen_ids:
            continue
        seen_ids.add(key)
        for n, v in zip(names, key):
            cands[n].append(v)
    return {
        "user_id": first.user_id,
        "profile": dict(first.profile),
        "history": {**{n: first.history[n].tolist() for n in names}, "timestamps": first.timestamps.tolist()},
        "candidates": cands,
    }


def cmd_explain(args: argparse.Namespace) -> int:
    from din_torchrec.serving.explain import explain_prepared
    from din_torchrec.serving.requests import RankRequest, RequestError

    pred = _predictor(args, cache_size=0)
    try:
        if args.request:
            try:
                body = json.loads(Path(args.request).read_text())
            except (OSError, json.JSONDecodeError) as e:
                return _fail(f"--request {args.request}: {e}")
        elif args.sample is not None:
            body = _sample_request(pred, args.sample, args.num_candidates)
        else:
            return _fail("explain needs --request FILE or --sample N")
        exp = explain_prepared(pred, pred.prepare(RankRequest.from_json(body)))
    except RequestError as e:
        return _fail(f"bad request: {e.message}")
    except ValueError as e:
        return _fail(str(e))
    out = Path(args.output_dir)
    json_path = exp.save_json(out / "explain.json")
    result: dict[str, Any] = {"json": str(json_path), "model": exp.model, "user_id": exp.user_id}
    if exp.attention:
        result["png"] = str(exp.plot(out / "explain.png", max_rows=args.max_rows))
    result["top"] = [
        {"candidate": int(i), "score": round(float(exp.scores[i]), 4)}
        for i in exp.order[: min(5, len(exp.order))]
    ]
    print(json.dumps(result, indent=2))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from din_torchrec.serving.requests import ServingPolicy
    from din_torchrec.serving.server import serve

    cfg, _ = _resolve(args)
    policy = ServingPolicy.for_config(
        cfg,
        long_history=args.long_history,
        unknown_ids=args.unknown_ids,
        max_candidates=args.max_candidates,
    )
    quantize = None if args.quantize == "none" else args.quantize
    pred = _predictor(args, policy=policy, cache_size=args.cache_size, quantize=quantize)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"din-torchrec serve: warning: listening on {args.host}, not loopback", file=sys.stderr)

    def ready(server) -> None:
        print(json.dumps({"url": server.url, "model": cfg.model.name, "quantization": quantize}), flush=True)

    counts = serve(
        pred,
        args.host,
        args.port,
        duration=args.duration,
        on_ready=ready,
        max_batch=args.max_batch,
    )
    print(json.dumps({"requests": counts}), flush=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from din_torchrec.serving.export import export_model
    from din_torchrec.serving.predictor import load_model

    cfg, ckpt = _resolve(args)
    model, _ = load_model(ckpt, cfg)
    path = export_model(model, cfg, args.output, max_history=args.max_history)
    print(json.dumps({"artefact": str(path), "model": cfg.model.name}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``explain``, ``serve`` and ``export`` to the main CLI's subparsers."""
    p = subparsers.add_parser("explain", help="attention weights of a trained model for a user's candidates")
    _add_model_args(p)
    p.add_argument("--request", help="JSON file with one ranking request")
    p.add_argument("--sample", type=int, help="use row N of the eval split instead of --request")
    p.add_argument("--num-candidates", type=int, default=10, help="with --sample: candidates (default 10)")
    p.add_argument("--output-dir", "-o", default="explain", help="where explain.json / explain.png go")
    p.add_argument("--max-rows", type=int, default=40, help="candidates drawn in the heatmap (best first)")
    p.set_defaults(func=cmd_explain)

    p = subparsers.add_parser("serve", help="HTTP JSON ranking service (POST /rank, /explain; GET /health)")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed)")
    p.add_argument("--cache-size", type=int, default=4096, help="user states kept in the LRU cache")
    p.add_argument("--quantize", choices=["none", "int8", "int4", "fp16"], default="none")
    p.add_argument("--max-candidates", type=int, default=2000, help="candidates per request")
    p.add_argument("--long-history", choices=["truncate", "reject"], default="truncate")
    p.add_argument("--unknown-ids", choices=["reject", "zero"], default="reject")
    p.add_argument("--max-batch", type=int, default=64, help="requests scored together")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("export", help="torch.export serving artefact (loads with torch alone)")
    _add_model_args(p)
    p.add_argument("--output", "-o", required=True, help="artefact path (.pt2)")
    p.add_argument("--max-history", type=int, help="padded history length (default data.max_history)")
    p.set_defaults(func=cmd_export)
