"""Checks on the sample files and the frequency table, with errors that say where and what.

Every check is vectorised over a whole chunk (one record batch) so that validating costs a few numpy
reductions per column, not a Python loop per row. Only when a check fails is the first offending row looked
up, to name it in the message.

A :class:`DataError` message always names the file and, where it applies, the column, the row (0-based,
counted from the start of that file) and what was expected, e.g.::

    data/train/part-0.parquet: column 'hist_item_ids', row 17: expected ids in [0, 20001) (table 'item',
    num_embeddings=20001), got 20001
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from din_torchrec.config import FeaturesConfig


class DataError(ValueError):
    """A sample file, or the frequency table, is missing, unreadable or holds values the model cannot use."""


def where(file: str | Path, column: str | None = None, row: int | None = None) -> str:
    """``"file: column 'c', row r"`` prefix of an error message (the parts that are known)."""
    parts = [str(file)]
    loc = []
    if column is not None:
        loc.append(f"column {column!r}")
    if row is not None:
        loc.append(f"row {row}")
    if loc:
        parts.append(", ".join(loc))
    return ": ".join(parts)


# --------------------------------------------------------------------------------------------------------
# Schema (per file, from the footer; no data read)
# --------------------------------------------------------------------------------------------------------


def _is_int(tp: pa.DataType) -> bool:
    return pa.types.is_integer(tp)


def _is_int_list(tp: pa.DataType) -> bool:
    return (pa.types.is_list(tp) or pa.types.is_large_list(tp)) and pa.types.is_integer(tp.value_type)


def _is_numeric(tp: pa.DataType) -> bool:
    return pa.types.is_integer(tp) or pa.types.is_floating(tp) or pa.types.is_boolean(tp)


def check_schema(
    file: str | Path,
    schema: pa.Schema,
    scalar_int_columns: Sequence[str],
    list_int_columns: Sequence[str],
    label_column: str,
) -> None:
    """Every needed column is present and of a usable arrow type.

    Args:
        file: the file the schema belongs to (named in the message).
        schema: its arrow schema.
        scalar_int_columns: columns that must be integer (ids, the target timestamp).
        list_int_columns: columns that must be ``list<integer>`` (histories and their timestamps).
        label_column: must be numeric (integer, floating or boolean).
    """
    present = schema.names
    for col in [*scalar_int_columns, *list_int_columns, label_column]:
        if col not in present:
            raise DataError(f"{where(file, col)}: missing column; the file has columns {present}")
    for col in scalar_int_columns:
        tp = schema.field(col).type
        if not _is_int(tp):
            raise DataError(f"{where(file, col)}: expected an integer column, got arrow type {tp}")
    for col in list_int_columns:
        tp = schema.field(col).type
        if not _is_int_list(tp):
            raise DataError(f"{where(file, col)}: expected a list<integer> column, got arrow type {tp}")
    tp = schema.field(label_column).type
    if not _is_numeric(tp):
        raise DataError(
            f"{where(file, label_column)}: expected a numeric 0/1 label column, got arrow type {tp}"
        )


# --------------------------------------------------------------------------------------------------------
# Values (per chunk)
# --------------------------------------------------------------------------------------------------------


def check_no_nulls(file: str | Path, column: str, arr: pa.Array, first_row: int) -> None:
    """``arr`` (one chunk of ``column``, starting at file row ``first_row``) has no null entries.

    For a list column this covers both null lists and null elements inside the lists.
    """
    if arr.null_count:
        bad = int(np.flatnonzero(~np.asarray(arr.is_valid()))[0])
        raise DataError(f"{where(file, column, first_row + bad)}: expected a value, got null")
    if isinstance(arr, (pa.ListArray, pa.LargeListArray)):
        offsets = np.asarray(arr.offsets)
        values = arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        if values.null_count:
            pos = int(np.flatnonzero(~np.asarray(values.is_valid()))[0]) + int(offsets[0])
            row = int(np.searchsorted(offsets, pos, side="right") - 1)
            raise DataError(
                f"{where(file, column, first_row + row)}: expected a list of ids, got a null element"
            )


def check_ids(
    file: str | Path,
    column: str,
    ids: np.ndarray,
    num_embeddings: int,
    table: str,
    first_row: int,
    offsets: np.ndarray | None = None,
) -> None:
    """Every id in ``ids`` lies in ``[0, num_embeddings)``.

    Args:
        ids: ``[n]`` ids of a scalar column, or the ``[sum of lengths]`` flat values of a list column.
        offsets: for a list column, ``[rows + 1]`` offsets of the rows into ``ids`` (to name the row of a bad
            id); None for a scalar column (position = row).
        first_row: file row of the chunk's first row.
    """
    if ids.size == 0:
        return
    lo, hi = ids.min(), ids.max()
    if lo >= 0 and hi < num_embeddings:
        return
    negative = lo < 0
    pos = int(np.flatnonzero(ids < 0)[0]) if negative else int(np.flatnonzero(ids >= num_embeddings)[0])
    row = pos if offsets is None else int(np.searchsorted(offsets, pos, side="right") - 1)
    value = int(ids[pos])
    if negative:
        raise DataError(
            f"{where(file, column, first_row + row)}: expected a non-negative id (table {table!r}), got {value}"
        )
    raise DataError(
        f"{where(file, column, first_row + row)}: expected ids in [0, {num_embeddings}) "
        f"(table {table!r}, num_embeddings={num_embeddings}), got {value}"
    )


def check_equal_lengths(
    file: str | Path, columns: Sequence[str], lengths: Sequence[np.ndarray], first_row: int
) -> None:
    """All list columns have the same length in every row (``lengths[i]`` is ``[rows]`` for ``columns[i]``)."""
    ref = lengths[0]
    for col, lens in zip(columns[1:], lengths[1:]):
        if not np.array_equal(ref, lens):
            row = int(np.flatnonzero(ref != lens)[0])
            raise DataError(
                f"{where(file, row=first_row + row)}: list columns {columns[0]!r} and {col!r} must have the "
                f"same length in every row, got {int(ref[row])} and {int(lens[row])}"
            )


def check_labels(file: str | Path, column: str, labels: np.ndarray, first_row: int) -> None:
    """Every label is exactly 0 or 1 (NaN fails both comparisons and is reported too)."""
    ok = (labels == 0) | (labels == 1)
    if not ok.all():
        row = int(np.flatnonzero(~ok)[0])
        raise DataError(
            f"{where(file, column, first_row + row)}: expected a label of 0 or 1, got {labels[row]}"
        )


# --------------------------------------------------------------------------------------------------------
# Frequencies
# --------------------------------------------------------------------------------------------------------


def open_table_npz(path: Path, what: str) -> np.lib.npyio.NpzFile:
    """Open an ``.npz`` archive of one array per table (frequencies, item features), or DataError naming
    ``path`` and ``what`` it was meant to be."""
    try:
        obj = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from e
    if not isinstance(obj, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: expected an .npz archive of one array per table, got a single array")
    return obj


def load_frequencies(path: str | Path, features: FeaturesConfig) -> dict[str, np.ndarray]:
    """Read ``frequencies.npz``: table name -> ``[num_embeddings]`` int64 counts over the training data.

    One array is required per table (every ``features.sequence[*].name`` and ``features.profile[*].name``),
    integer, one-dimensional, non-negative and exactly ``num_embeddings`` long; extra arrays are ignored.

    Raises:
        DataError: naming the file (and the table) when it is missing, unreadable or does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: frequency file does not exist")
    tables = [(t.name, t.num_embeddings) for t in features.sequence]
    tables += [(p.name, p.num_embeddings) for p in features.profile]
    out: dict[str, np.ndarray] = {}
    with open_table_npz(path, "frequency file") as npz:
        present = list(npz.files)
        for name, size in tables:
            if name not in present:
                raise DataError(f"{path}: table {name!r}: missing frequency array; the file has {present}")
            try:
                arr = npz[name]
            except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
                raise DataError(f"{path}: table {name!r}: cannot read array ({type(e).__name__}: {e})") from e
            if arr.ndim != 1 or arr.dtype.kind not in "iu":
                raise DataError(
                    f"{path}: table {name!r}: expected a 1-d integer array, got {arr.dtype} of shape {arr.shape}"
                )
            if arr.shape[0] != size:
                raise DataError(
                    f"{path}: table {name!r}: expected {size} counts (num_embeddings), got {arr.shape[0]}"
                )
            if arr.size and arr.min() < 0:
                raise DataError(f"{path}: table {name!r}: expected non-negative counts, got {int(arr.min())}")
            out[name] = arr.astype(np.int64, copy=False)
    return out
