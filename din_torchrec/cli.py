"""``din-torchrec``: one entry point for generating data, training, evaluating and the demo.

Every command takes ``--config FILE`` (YAML, see ``configs/``) and ``--set key.path=value`` overrides.
Several processes: ``torchrun --nproc_per_node 2 -m din_torchrec.cli train --config ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from din_torchrec.config import ConfigError, ExperimentConfig, add_config_arguments, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)


def _load(args: argparse.Namespace) -> ExperimentConfig:
    return load_config(args.config, args.overrides)


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def cmd_generate(args: argparse.Namespace) -> int:
    from din_torchrec.data.generator import generate_dataset

    cfg = _load(args)
    out = Path(args.out or cfg.data.dir)
    meta = generate_dataset(cfg.data.generator, out, progress=not args.quiet)
    print(json.dumps({"out_dir": str(out), "rows": meta["rows"], "click_rate": meta["click_rate"]}, indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from din_torchrec.training.trainer import train

    cfg = _load(args)
    result = train(cfg)
    if _is_main():
        print(
            json.dumps(
                {
                    "model": result["model"],
                    **_headline(result["final"]),
                    "train_samples_per_s": round(result["train_samples_per_s"], 1),
                    "peak_rss_mb": round(result["peak_rss_mb"], 1),
                    "output_dir": cfg.training.output_dir,
                },
                indent=2,
            )
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from din_torchrec.training.trainer import evaluate_checkpoint
    from din_torchrec.utils.io import atomic_write_json

    cfg = _load(args)
    checkpoint = args.checkpoint or str(Path(cfg.training.output_dir) / "checkpoint")
    metrics = evaluate_checkpoint(cfg, checkpoint)
    if _is_main():
        if args.output:
            atomic_write_json(args.output, metrics)
        print(json.dumps({k: v for k, v in metrics.items() if k != "checkpoint_meta"}, indent=2))
    return 0


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    return {k: round(m[k], 4) for k in ("auc", "gauc", "logloss") if k in m}


def _dataset_matches(cfg: ExperimentConfig) -> bool:
    """True when ``data.dir`` already holds a dataset made by the same generator settings."""
    from din_torchrec.config import to_dict

    meta = Path(cfg.data.dir) / "meta.json"
    if not meta.exists():
        return False
    try:
        return json.loads(meta.read_text()).get("generator") == to_dict(cfg.data.generator)
    except (OSError, json.JSONDecodeError):
        return False


def cmd_demo(args: argparse.Namespace) -> int:
    """Generate the default dataset (once), train the base model and DIN, evaluate, print the metrics."""
    import copy

    from din_torchrec.data.generator import generate_dataset
    from din_torchrec.training.trainer import evaluate_checkpoint, peak_rss_mb, train
    from din_torchrec.utils.io import atomic_write_json

    cfg = _load(args)
    t0 = time.perf_counter()
    if _dataset_matches(cfg):
        print(f"[demo] using the dataset already in {cfg.data.dir}")
    else:
        print(
            f"[demo] generating {cfg.data.generator.train_samples:,} train + {cfg.data.generator.test_samples:,} test samples into {cfg.data.dir}"
        )
        generate_dataset(cfg.data.generator, cfg.data.dir, progress=True)
    root = Path(cfg.training.output_dir)
    results: dict[str, dict[str, Any]] = {}
    for name in ("base", "din"):
        run_cfg = copy.deepcopy(cfg)
        run_cfg.model.name = name  # type: ignore[assignment]
        run_cfg.training.output_dir = str(root / name)
        results[name] = train(run_cfg)
    din_cfg = copy.deepcopy(cfg)
    din_cfg.model.name = "din"  # type: ignore[assignment]
    din_cfg.training.output_dir = str(root / "din")
    reloaded = evaluate_checkpoint(din_cfg, root / "din" / "checkpoint")
    summary = {
        "base": {
            **_headline(results["base"]["final"]),
            "train_samples_per_s": results["base"]["train_samples_per_s"],
        },
        "din": {
            **_headline(results["din"]["final"]),
            "train_samples_per_s": results["din"]["train_samples_per_s"],
        },
        "din_reloaded_from_checkpoint": _headline(reloaded),
        "peak_rss_mb": peak_rss_mb(),
        "wall_seconds": time.perf_counter() - t0,
    }
    base_auc = summary["base"]["auc"]
    summary["din_relaimpr_percent"] = 100.0 * ((summary["din"]["auc"] - 0.5) / (base_auc - 0.5) - 1.0)
    atomic_write_json(root / "summary.json", summary)
    print()
    print("model   AUC     gAUC    logloss  train samples/s")
    for name in ("base", "din"):
        r = summary[name]
        print(
            f"{name:<7} {r['auc']:.4f}  {r['gauc']:.4f}  {r['logloss']:.4f}   {r['train_samples_per_s']:>10,.0f}"
        )
    print(
        f"DIN reloaded from its checkpoint: AUC {reloaded['auc']:.4f}  gAUC {reloaded['gauc']:.4f}  logloss {reloaded['logloss']:.4f}"
    )
    print(f"RelaImpr of DIN over base (AUC): {summary['din_relaimpr_percent']:+.1f}%")
    print(f"peak memory {summary['peak_rss_mb']:.0f} MiB, wall time {summary['wall_seconds']:.0f} s")
    print(
        f"curves: {root / 'base' / 'training_curve.png'}, {root / 'din' / 'training_curve.png'}; summary: {root / 'summary.json'}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Train several models on one dataset under the same settings; write the comparison table and curves."""
    from din_torchrec.training.report import run_report

    cfg = _load(args)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    out = args.out or str(Path(cfg.training.output_dir) / "report")
    result = run_report(cfg, out, models, title=args.title or "")
    if _is_main():
        print(result["table"])
        print(f"written: {out}/report.md, {out}/report.json, {out}/validation_curves.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="din-torchrec", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="WARNING", help="python logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="write a synthetic parquet dataset with planted interest structure")
    _add_config_args(p)
    p.add_argument("--out", help="output folder (default: data.dir of the config)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train and evaluate a model (one process, or many under torchrun)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on the eval split")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="checkpoint folder (default: <training.output_dir>/checkpoint)")
    p.add_argument("--output", help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "report", help="train base, DIN, DIEN, DSIN on one dataset; write a comparison table + PNG"
    )
    _add_config_args(p)
    p.add_argument(
        "--models", default="base,din,dien,dsin", help="comma-separated; the first is the baseline"
    )
    p.add_argument("--out", help="output folder (default: <training.output_dir>/report)")
    p.add_argument("--title", help="heading of the report")
    p.set_defaults(func=cmd_report)

    from din_torchrec.bench.cli import register as register_bench
    from din_torchrec.data.prepare.cli import register as register_prepare
    from din_torchrec.distributed import plan_cli
    from din_torchrec.serving.cli import register as register_serving

    plan_cli.register(sub)
    register_serving(sub)
    register_prepare(sub)
    register_bench(sub)

    p = sub.add_parser("demo", help="generate data, train base and DIN, evaluate, print the metrics")
    _add_config_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING))
    _quiet_third_party()
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"din-torchrec: config error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        # DataError and CheckpointError derive from these; show the message, not a traceback.
        if type(e).__name__ in ("DataError", "CheckpointError"):
            print(f"din-torchrec: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        from din_torchrec.distributed.env import shutdown_distributed

        shutdown_distributed()


def _quiet_third_party() -> None:
    """TorchRec's planner and DDP warn about CPU-only set-ups on every run; keep the demo output readable."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("torchrec", "torch.distributed", "torch.fx"):
        logging.getLogger(name).setLevel(logging.ERROR)


def run() -> None:
    """Console entry point (``din-torchrec``, ``python -m din_torchrec.cli``): ``main()``, then exit.

    A process that made or joined a process group -- every rank of a torchrun / TorchX job (``WORLD_SIZE`` > 1),
    and a one-process training run, whose DistributedModelParallel runs over a one-rank gloo group -- and
    finished without an exception leaves through :func:`~din_torchrec.distributed.env.exit_process` once its
    output is flushed, skipping the interpreter's finalization: a gloo worker thread releasing a finished
    collective's tensors while the interpreter shuts down would otherwise abort the rank after all its work
    was done ("terminate called without an active exception"; the reasoning is in ``exit_process``).
    Everything a command writes is closed (and renamed into place) before ``main`` returns, so nothing is lost.
    """
    from din_torchrec.distributed.env import exit_process, made_process_group

    peers = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    rc = main()
    if peers or made_process_group():
        exit_process(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
