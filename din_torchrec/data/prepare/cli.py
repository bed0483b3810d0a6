"""``din-torchrec prepare amazon | movielens | taobao``: the command line of :mod:`din_torchrec.data.prepare`.

Wiring: ``register(subparsers)`` adds the ``prepare`` command to the main parser; the parsed arguments carry
``func`` (returns an exit code: 0, or 2 with a one-line message on stderr for bad input). Standalone:
``python -m din_torchrec.data.prepare.cli amazon --reviews ... --meta ... --out ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from din_torchrec.data.prepare.core import LAYOUTS, PROTOCOLS
from din_torchrec.data.prepare.errors import ON_ERROR_CHOICES
from din_torchrec.data.validation import DataError

__all__ = ["build_parser", "cmd_prepare", "main", "register"]

_DESCRIPTION = """\
Convert a public dataset, as downloaded, into this project's sample format (docs/data_format.md) with the
papers' protocol, and write <out>/experiment.yaml, a config that trains on it:

  din-torchrec prepare amazon --reviews reviews_Electronics_5.json.gz --meta meta_Electronics.json.gz \\
      --out data/amazon_electronics
  din-torchrec train --config data/amazon_electronics/experiment.yaml

Histories are stored once per user (--layout referenced, the default) unless --layout flat. Bad lines stop
the conversion with the file and line (--on-error raise) or are left out and counted in meta.json
(--on-error skip). See docs/datasets.md.
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", required=True, help="output dataset folder (created; earlier outputs are replaced)"
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="din",
        help="din: a positive + negative pair per behaviour k >= 1, each user's last one to test (DIN paper); "
        "dien: one pair per user and split, train target = second-to-last behaviour, test = last (DIEN "
        "paper). Default: din",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the negatives and the train shuffle (default 0)"
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="referenced",
        help="referenced: each user's sequence stored once in histories/, samples point into it (default); "
        "flat: every sample row carries its own history lists",
    )
    p.add_argument(
        "--on-error",
        choices=ON_ERROR_CHOICES,
        default="raise",
        help="raise: stop at the first bad line, naming file and line (default); skip: leave bad lines out and "
        "count them per file and reason in meta.json ('skipped')",
    )
    p.add_argument(
        "--max-history",
        type=int,
        default=0,
        metavar="N",
        help="keep at most the N most recent behaviours in each sample's history (default 0: all)",
    )
    p.add_argument(
        "--keep-repeats",
        action="store_true",
        help="keep every behaviour of a repeated (user, item) pair (default: only the first, so a history "
        "never holds its target's item)",
    )
    p.add_argument("--rows-per-file", type=int, default=1_000_000, help="sample rows per part file")
    p.add_argument("--row-group-size", type=int, default=65_536, help="rows per parquet row group")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _run_amazon(a: argparse.Namespace, kw: dict[str, Any]) -> dict[str, Any]:
    from din_torchrec.data.prepare import prepare_amazon

    return prepare_amazon(
        a.reviews, a.meta, a.out, unknown_meta=a.unknown_meta, category_path=a.category_path, **kw
    )


def _run_movielens(a: argparse.Namespace, kw: dict[str, Any]) -> dict[str, Any]:
    from din_torchrec.data.prepare import prepare_movielens

    return prepare_movielens(a.dir, a.out, min_rating=a.min_rating, **kw)


def _run_taobao(a: argparse.Namespace, kw: dict[str, Any]) -> dict[str, Any]:
    from din_torchrec.data.prepare import prepare_taobao

    types = [t.strip() for t in a.behavior_types.split(",") if t.strip()]
    return prepare_taobao(a.csv, a.out, behavior_types=types, **kw)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Run the chosen converter; print a JSON summary. 0 on success, 2 on bad input or options."""
    kw = {
        "protocol": args.protocol,
        "seed": args.seed,
        "layout": args.layout,
        "on_error": args.on_error,
        "max_history": args.max_history,
        "keep_repeats": args.keep_repeats,
        "rows_per_file": args.rows_per_file,
        "row_group_size": args.row_group_size,
        "progress": not args.quiet,
    }
    start = time.perf_counter()
    try:
        meta = args.prepare_source(args, kw)
    except (DataError, ValueError) as e:
        print(f"din-torchrec prepare: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    skipped = meta["skipped"]
    summary = {
        "out_dir": str(out),
        "source": meta["source"]["name"],
        "layout": meta["layout"],
        "protocol": meta["protocol"]["name"],
        "rows": meta["rows"],
        "tables": meta["tables"],
        "counts": meta["counts"],
        "ignored": meta["ignored"],
        "skipped_total": sum(r["count"] for reasons in skipped.values() for r in reasons.values()),
        "skipped": skipped,
        "seconds": round(time.perf_counter() - start, 2),
        "train": f"din-torchrec train --config {out / 'experiment.yaml'}",
    }
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``prepare`` (with its ``amazon``, ``movielens`` and ``taobao`` sub-commands) to ``subparsers``."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = subparsers.add_parser(
        "prepare",
        help="convert a public dataset (Amazon, MovieLens, Taobao) as downloaded into parquet samples",
        description=_DESCRIPTION,
        formatter_class=fmt,
    )
    sources = p.add_subparsers(dest="source", required=True, metavar="{amazon,movielens,taobao}")

    a = sources.add_parser(
        "amazon",
        help="Amazon product data 2014: reviews_<Category>_5.json(.gz) + meta_<Category>.json(.gz)",
        description="Amazon product data (2014 release). A review is a behaviour; an item's category is the "
        "last element of the first path in its meta 'categories'. Meta lines may be strict JSON or Python "
        "literals; plain or gzip files.",
    )
    a.add_argument(
        "--reviews", required=True, help="reviews_<Category>_5.json or .json.gz (one review per line)"
    )
    a.add_argument("--meta", required=True, help="meta_<Category>.json or .json.gz (one product per line)")
    a.add_argument(
        "--unknown-meta",
        choices=("ignore", "error"),
        default="ignore",
        help="meta entries of items without a review: ignore = count them in meta.json (default; the meta "
        "file covers the whole category, the 5-core reviews a subset); error = treat each as a bad line",
    )
    a.add_argument(
        "--category-path",
        choices=("first", "last"),
        default="first",
        help="an item's category is the last element of this path of its meta 'categories': first (default) "
        "or last (what the DIN repository's preprocessing takes, x[-1][-1])",
    )
    _common(a)
    a.set_defaults(func=cmd_prepare, prepare_source=_run_amazon)

    m = sources.add_parser(
        "movielens",
        help="MovieLens ml-100k or ml-1m folder (detected from its files)",
        description="MovieLens ml-100k (u.data, u.item, u.user) or ml-1m (ratings.dat, movies.dat, "
        "users.dat). A rating is a behaviour; an item's category is its first genre; the users file, when "
        "present, adds user_age, user_gender and user_occupation profile columns.",
    )
    m.add_argument("--dir", required=True, help="the unpacked ml-100k or ml-1m folder")
    m.add_argument(
        "--min-rating",
        type=float,
        default=None,
        metavar="R",
        help="only ratings >= R are behaviours (default: every rating)",
    )
    _common(m)
    m.set_defaults(func=cmd_prepare, prepare_source=_run_movielens)

    t = sources.add_parser(
        "taobao",
        help="Taobao User Behavior: UserBehavior.csv (streamed; ~100M lines)",
        description="Taobao User Behavior (user,item,category,behavior_type,timestamp; no header). Clicks "
        "(pv) are the behaviours; timestamps are kept for DSIN's sessions. Read in blocks with pyarrow.",
    )
    t.add_argument("--csv", required=True, help="UserBehavior.csv (or .csv.gz)")
    t.add_argument(
        "--behavior-types",
        default="pv",
        metavar="TYPES",
        help="comma-separated behaviour types that count as behaviours, from pv,buy,cart,fav (default pv)",
    )
    _common(t)
    t.set_defaults(func=cmd_prepare, prepare_source=_run_taobao)
    return p


def build_parser() -> argparse.ArgumentParser:
    """A parser with only the ``prepare`` command's sources at the top level (for standalone use)."""
    parser = argparse.ArgumentParser(prog="din-torchrec")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``din-torchrec prepare ...`` without the rest of the CLI: ``main(["prepare", "amazon", ...])``."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
