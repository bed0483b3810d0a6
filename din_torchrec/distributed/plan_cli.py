"""``din-torchrec plan``: plan a model's embedding tables for a declared cluster, report, save the plan.

    din-torchrec plan --config configs/din_2b_catalog.yaml \\
        --topology configs/topologies/gpu_64x8_h100.yaml --out plan.json --report-json report.json

Exit codes: 0 planned (and saved), 1 no plan fits (the reason on stderr), 2 a config or topology error.
Wire into ``din_torchrec.cli.build_parser`` with ``plan_cli.register(sub)``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from din_torchrec.config import ConfigError, add_config_arguments, load_config
from din_torchrec.utils.io import atomic_write_json


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plan`` command to ``subparsers`` (the result of ``parser.add_subparsers``)."""
    p = subparsers.add_parser(
        "plan",
        help="plan the embedding tables for a cluster (meta device: no table is allocated), report, save",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p)
    p.add_argument("--topology", "-t", required=True, help="topology YAML (see configs/topologies/)")
    p.add_argument(
        "--topology-set",
        dest="topology_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a topology value, e.g. --topology-set world_size=32 (repeatable)",
    )
    p.add_argument("--out", "-o", help="write the plan (JSON) here, for training.plan_path")
    p.add_argument("--report-json", help="write the report (JSON: tables, ranks, memory, cost) here")
    p.add_argument("--quiet", "-q", action="store_true", help="print only a one-line summary")
    p.set_defaults(func=cmd_plan)
    return p


def cmd_plan(args: argparse.Namespace) -> int:
    """Run the ``plan`` command; returns the exit code."""
    from din_torchrec.distributed.planning import (
        PlanDoesNotFit,
        format_report,
        human_bytes,
        load_topology,
        plan_for_topology,
        save_plan,
    )

    cfg = load_config(args.config, args.overrides)
    topo = load_topology(args.topology, args.topology_overrides)
    try:
        result = plan_for_topology(cfg, topo)
    except PlanDoesNotFit as e:
        if args.report_json:
            atomic_write_json(args.report_json, e.report)
        print(f"din-torchrec plan: {e}", file=sys.stderr)
        return 1
    report = result.report
    if args.quiet:
        hbm = (
            f"{human_bytes(report['max_hbm_used_bytes'])} HBM, " if report["compute_device"] != "cpu" else ""
        )
        print(
            f"planned {len(report['tables'])} tables on {report['world_size']} ranks in "
            f"{report['planning_seconds']:.2f} s; most used rank {hbm}{human_bytes(report['max_ddr_used_bytes'])} DRAM"
        )
    else:
        print(format_report(report))
    if args.report_json:
        atomic_write_json(args.report_json, report)
    if args.out:
        save_plan(args.out, result)
        if not args.quiet:
            print(f"plan saved to {args.out} (use it with --set training.plan_path={args.out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m din_torchrec.distributed.plan_cli ...``)."""
    parser = argparse.ArgumentParser(prog="din-torchrec")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.WARNING)
    for name in ("torchrec", "torch.distributed", "fbgemm_gpu"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"din-torchrec: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
