"""Convert the public datasets of the DIN/DIEN/DSIN papers, as downloaded, into this project's sample format.

One function per source; each parses the user's files, applies the papers' sample protocol and writes a
dataset folder (``docs/data_format.md``; ``referenced`` layout by default, see
:mod:`din_torchrec.data.referenced`), plus ``vocab/`` and a ready-to-train ``experiment.yaml``:

* :func:`prepare_amazon`: ``reviews_<Category>_5.json(.gz)`` + ``meta_<Category>.json(.gz)`` (2014 release).
* :func:`prepare_movielens`: an unpacked ml-100k or ml-1m folder.
* :func:`prepare_taobao`: ``UserBehavior.csv`` (streamed).

Common keyword arguments: ``protocol`` (``din`` | ``dien``), ``seed``, ``layout`` (``referenced`` | ``flat``),
``on_error`` (``raise`` | ``skip``), ``max_history`` (0 = whole history), ``keep_repeats``, ``rows_per_file``,
``row_group_size``, ``progress``. Each returns the dict written to ``meta.json``. See ``docs/datasets.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from din_torchrec.data.prepare.core import LAYOUTS, PROTOCOLS, check_options, write_dataset
from din_torchrec.data.prepare.errors import ON_ERROR_CHOICES, ErrorLog, PrepareError

__all__ = [
    "LAYOUTS",
    "ON_ERROR_CHOICES",
    "PROTOCOLS",
    "PrepareError",
    "prepare_amazon",
    "prepare_movielens",
    "prepare_taobao",
]


def _write(src: Any, out: str | Path, log: ErrorLog, **kw: Any) -> dict[str, Any]:
    return write_dataset(src, out, log=log, **kw)


def prepare_amazon(
    reviews: str | Path,
    meta: str | Path,
    out: str | Path,
    *,
    protocol: str = "din",
    seed: int = 0,
    layout: str = "referenced",
    on_error: str = "raise",
    max_history: int = 0,
    keep_repeats: bool = False,
    unknown_meta: str = "ignore",
    category_path: str = "first",
    rows_per_file: int = 1_000_000,
    row_group_size: int = 65_536,
    progress: bool = False,
) -> dict[str, Any]:
    """Amazon reviews + meta -> dataset folder ``out`` (:mod:`din_torchrec.data.prepare.amazon`)."""
    from din_torchrec.data.prepare.amazon import read_amazon

    check_options(protocol, layout, max_history)
    log = ErrorLog(on_error)
    src = read_amazon(
        reviews, meta, log=log, unknown_meta=unknown_meta, category_path=category_path, progress=progress
    )
    return _write(
        src,
        out,
        log,
        protocol=protocol,
        seed=seed,
        layout=layout,
        max_history=max_history,
        keep_repeats=keep_repeats,
        rows_per_file=rows_per_file,
        row_group_size=row_group_size,
    )


def prepare_movielens(
    directory: str | Path,
    out: str | Path,
    *,
    min_rating: float | None = None,
    protocol: str = "din",
    seed: int = 0,
    layout: str = "referenced",
    on_error: str = "raise",
    max_history: int = 0,
    keep_repeats: bool = False,
    rows_per_file: int = 1_000_000,
    row_group_size: int = 65_536,
    progress: bool = False,
) -> dict[str, Any]:
    """An ml-100k / ml-1m folder -> dataset folder ``out`` (:mod:`din_torchrec.data.prepare.movielens`)."""
    from din_torchrec.data.prepare.movielens import read_movielens

    check_options(protocol, layout, max_history)
    log = ErrorLog(on_error)
    src = read_movielens(directory, log=log, min_rating=min_rating, progress=progress)
    return _write(
        src,
        out,
        log,
        protocol=protocol,
        seed=seed,
        layout=layout,
        max_history=max_history,
        keep_repeats=keep_repeats,
        rows_per_file=rows_per_file,
        row_group_size=row_group_size,
    )


def prepare_taobao(
    csv: str | Path,
    out: str | Path,
    *,
    behavior_types: Sequence[str] = ("pv",),
    protocol: str = "din",
    seed: int = 0,
    layout: str = "referenced",
    on_error: str = "raise",
    max_history: int = 0,
    keep_repeats: bool = False,
    rows_per_file: int = 1_000_000,
    row_group_size: int = 65_536,
    block_size: int = 16 << 20,
    progress: bool = False,
) -> dict[str, Any]:
    """``UserBehavior.csv`` -> dataset folder ``out`` (:mod:`din_torchrec.data.prepare.taobao`)."""
    from din_torchrec.data.prepare.taobao import read_taobao

    check_options(protocol, layout, max_history)
    log = ErrorLog(on_error)
    src = read_taobao(csv, log=log, behavior_types=behavior_types, block_size=block_size, progress=progress)
    return _write(
        src,
        out,
        log,
        protocol=protocol,
        seed=seed,
        layout=layout,
        max_history=max_history,
        keep_repeats=keep_repeats,
        rows_per_file=rows_per_file,
        row_group_size=row_group_size,
    )
