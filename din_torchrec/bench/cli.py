"""``din-torchrec bench``: embeddings | train | kernels | prefetch | compare | gpu-check.

Wired into the main CLI with :func:`register` (``din_torchrec.cli.build_parser``); also runnable alone as
``python -m din_torchrec.bench.cli <subcommand> ...``. Every subcommand writes ``<name>.json`` and
``<name>.png`` into ``--out`` (default ``runs/bench``) and prints the table; ``--small`` runs the tiny preset
(seconds; what the tests run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _ints(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _strs(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--out", default="runs/bench", help="output folder (default runs/bench)")
    p.add_argument("--small", action="store_true", help="tiny preset for tests (seconds)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: leave as is). On a shared machine 1 avoids OpenMP barrier stalls",
    )
    p.set_defaults(bench_name=name)


def _threads(args: argparse.Namespace) -> None:
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    for name in ("torchrec", "torch.distributed", "torch.fx", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)


def cmd_embeddings(args: argparse.Namespace) -> int:
    from din_torchrec.bench.embeddings import grid_points, preset_points, run_embeddings

    _threads(args)
    _quiet()
    if args.rows or args.dims or args.poolings or args.batches or args.dtypes:
        points = grid_points(
            _ints(args.rows or "1000000"),
            _ints(args.dims or "64"),
            _ints(args.poolings or "50"),
            _ints(args.batches or "4096"),
            _strs(args.dtypes or "fp32"),
            _strs(args.modes),
        )
        preset = "grid"
    else:
        preset = "small" if args.small else args.preset
        points = preset_points(preset)
    small = args.small
    report = run_embeddings(
        points,
        args.out,
        rounds=args.rounds or (2 if small else 3),
        target_s=args.target_seconds or (0.01 if small else 0.3),
        max_iters=5 if small else 200,
        stream_mb=16 if small else args.stream_mb,
        max_table_gb=args.max_table_gb,
        multiprocess=not args.no_multiprocess,
        preset=preset,
    )
    print(f"written: {Path(args.out) / 'embeddings.json'}, {Path(args.out) / 'embeddings.png'}")
    return 0 if report["results"] else 1


def cmd_train(args: argparse.Namespace) -> int:
    from din_torchrec.bench.train import PRESETS, TrainSettings, run_train

    _threads(args)
    _quiet()
    s = TrainSettings(**PRESETS["small" if args.small else "full"])
    for key in ("history", "dim", "batch", "steps", "rounds", "items"):
        value = getattr(args, key)
        if value:
            setattr(s, key, value)
    if args.models:
        s.models = _strs(args.models)
    s.lengths = args.lengths
    s.precision = args.precision
    s.activation = args.activation
    s.sparse_optimizer = args.sparse_optimizer
    run_train(s, args.out, preset="small" if args.small else "full")
    print(f"written: {Path(args.out) / 'train.json'}, {Path(args.out) / 'train.png'}")
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from din_torchrec.bench.kernels import PRESETS, KernelSettings, run_kernels

    _threads(args)
    s = KernelSettings(**PRESETS["small" if args.small else "full"])
    for key in ("history", "batch", "loop_batch", "dim", "rounds"):
        value = getattr(args, key)
        if value:
            setattr(s, key, value)
    s.lengths = args.lengths
    s.activation = args.activation
    if args.cases:
        s.cases = _strs(args.cases)
    report = run_kernels(s, args.out, preset="small" if args.small else "full")
    bad = [
        r["name"]
        for r in report["results"]
        if not r["max_abs_diff"] <= 1e-3 * max(1.0, r.get("rows", 1) ** 0.5)
    ]
    if bad:
        print(f"fast path and reference disagree: {bad}", file=sys.stderr)
        return 1
    print(f"written: {Path(args.out) / 'kernels.json'}, {Path(args.out) / 'kernels.png'}")
    return 0


def cmd_prefetch(args: argparse.Namespace) -> int:
    from din_torchrec.bench.prefetch import run_prefetch

    _threads(args)
    _quiet()
    run_prefetch(args.out, small=args.small, data_dir=args.data, steps=args.steps, depth=args.depth)
    print(f"written: {Path(args.out) / 'prefetch.json'}, {Path(args.out) / 'prefetch.png'}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from din_torchrec.bench.compare import CompareSettings, run_compare

    _threads(args)
    _quiet()
    s = CompareSettings.small() if args.small else CompareSettings()
    for key in ("epochs", "batch", "history", "dim", "train_samples", "test_samples"):
        value = getattr(args, key)
        if value:
            setattr(s, key, value)
    if args.models:
        s.models = _strs(args.models)
    s.peer = not args.no_peer
    if args.variants is not None:
        s.variants = [v for v in _strs(args.variants) if v and v != "none"]
    s.repeats = args.repeats
    s.threads = args.threads
    if args.venv:
        s.venv = args.venv
    if args.data:
        s.data_dir = args.data
    if args.runs:
        s.runs_dir = args.runs
    report = run_compare(s, args.out)
    print(f"written: {Path(args.out) / 'compare.json'}, {Path(args.out) / 'compare.png'}")
    return 0 if report["results"] else 1


def cmd_gpu_check(args: argparse.Namespace) -> int:
    from din_torchrec.bench.gpu_check import main as gpu_main

    argv = ["--out", args.out]
    if args.small:
        argv.append("--small")
    if args.device:
        argv += ["--device", args.device]
    argv += ["--activation", args.activation]
    return gpu_main(argv)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` with its subcommands to the main CLI's subparsers."""
    bench = subparsers.add_parser(
        "bench", help="benchmarks: embeddings, train, kernels, prefetch, compare, gpu-check"
    )
    sub = bench.add_subparsers(dest="bench_command", required=True)

    p = sub.add_parser(
        "embeddings", help="lookups/s and GB/s of TorchRec / nn.EmbeddingBag / FBGEMM TBE vs memory bandwidth"
    )
    _common(p, "embeddings")
    p.add_argument(
        "--preset", default="full", choices=["full", "small"], help="the documented sweep (default full)"
    )
    p.add_argument("--rows", help="grid instead of a preset: comma-separated table rows, e.g. 1e6,5e7")
    p.add_argument("--dims", help="grid: embedding dims, e.g. 16,64,128")
    p.add_argument("--poolings", help="grid: pooling factors, e.g. 1,50,200")
    p.add_argument("--batches", help="grid: batch sizes")
    p.add_argument("--dtypes", help="grid: fp32,fp16,int8,int4")
    p.add_argument("--modes", default="fwd", help="grid: fwd,train")
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds per point (default 3)")
    p.add_argument(
        "--target-seconds", type=float, default=0.0, help="seconds per kernel per round (default 0.3)"
    )
    p.add_argument("--stream-mb", type=float, default=256.0, help="STREAM array size in MiB (default 256)")
    p.add_argument(
        "--max-table-gb",
        type=float,
        default=None,
        help="skip points whose tables exceed this (default: half the available memory)",
    )
    p.add_argument(
        "--no-multiprocess", action="store_true", help="skip the world-size-2 (two gloo processes) runs"
    )
    p.set_defaults(func=cmd_embeddings)

    p = sub.add_parser(
        "train", help="end-to-end training samples/s, step breakdown and peak memory per model"
    )
    _common(p, "train")
    p.add_argument(
        "--models",
        help="comma-separated (default base,din,dien,dsin); NAME+bf16: bf16 autocast, NAME+compile: torch.compile of the dense hot spots, or both",
    )
    p.add_argument("--history", type=int, default=0, help="max history length (default 50)")
    p.add_argument("--dim", type=int, default=0, help="embedding dim (default 16)")
    p.add_argument("--batch", type=int, default=0, help="batch size (default 1024)")
    p.add_argument("--items", type=int, default=0, help="rows of the item table (default 20001)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per round (default 10)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3)")
    p.add_argument(
        "--lengths",
        default="uniform",
        choices=["uniform", "full"],
        help="history lengths: uniform in [1, T] or all T",
    )
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument(
        "--sparse-optimizer", default="rowwise_adagrad", choices=["rowwise_adagrad", "adagrad", "sgd"]
    )
    p.add_argument("--activation", default="dice", choices=["dice", "prelu", "relu"])
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "kernels", help="fast paths vs their references (forward + backward) at a history length"
    )
    _common(p, "kernels")
    p.add_argument("--history", type=int, default=0, help="history length T (default 200)")
    p.add_argument("--batch", type=int, default=0, help="batch (default 1024)")
    p.add_argument(
        "--loop-batch", type=int, default=0, help="batch of the per-sample loop references (default 32)"
    )
    p.add_argument("--dim", type=int, default=0, help="behaviour width (default 32)")
    p.add_argument("--rounds", type=int, default=0, help="interleaved rounds (default 3)")
    p.add_argument("--lengths", default="uniform", choices=["uniform", "full"])
    p.add_argument("--activation", default="dice", choices=["dice", "prelu", "relu"])
    p.add_argument("--cases", help="comma-separated subset of the cases")
    p.set_defaults(func=cmd_kernels)

    p = sub.add_parser("prefetch", help="training with and without the background-thread prefetcher")
    _common(p, "prefetch")
    p.add_argument("--data", help="dataset folder (default: generate a small one under --out)")
    p.add_argument("--steps", type=int, default=0, help="steps per contender per round")
    p.add_argument("--depth", type=int, default=2, help="batches read ahead")
    p.set_defaults(func=cmd_prefetch)

    p = sub.add_parser(
        "compare", help="this project's DIN/DIEN vs DeepCTR-Torch's on the same generated data"
    )
    _common(p, "compare")
    p.add_argument("--models", help="comma-separated: din,dien (default din,dien)")
    p.add_argument("--epochs", type=int, default=0)
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--history", type=int, default=0)
    p.add_argument("--dim", type=int, default=0)
    p.add_argument("--train-samples", type=int, default=0)
    p.add_argument("--test-samples", type=int, default=0)
    p.add_argument("--data", help="dataset folder (generated there if missing)")
    p.add_argument("--runs", help="folder of this project's training runs (default runs/bench/compare_runs)")
    p.add_argument(
        "--venv", help="DeepCTR-Torch virtualenv (default benchmarks/.venv-deepctr, created if missing)"
    )
    p.add_argument("--no-peer", action="store_true", help="run only this project's side")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs per contender, order alternating; best counts"
    )
    p.add_argument(
        "--variants",
        help="comma-separated extra runs of this project's models: compile, bf16, bf16+compile "
        "(default compile,bf16+compile; 'none' for the plain run only)",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "gpu-check",
        help="interaction modules fwd+bwd samples/s, reference vs fast, bf16 and fp32 (pure PyTorch)",
    )
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--small", action="store_true")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--activation", default="dice", choices=["dice", "prelu", "relu"])
    p.set_defaults(func=cmd_gpu_check)
    return bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="din-torchrec")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]] if sys.argv[1:2] != ["bench"] else sys.argv[1:]))
