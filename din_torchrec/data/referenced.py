"""Histories stored once: the ``referenced`` dataset layout and its reader.

In the ``flat`` layout (``docs/data_format.md``) every sample row carries its whole history, so a user with
``T`` behaviours costs ``O(T^2)`` history cells under the DIN protocol (one sample per prefix). The
``referenced`` layout stores each user's behaviour sequence **once** and lets the samples point into it::

    <dir>/
      histories/part-00000.parquet   user_id, hist_item_ids, hist_cate_ids, hist_timestamps (the whole
                                     sequence of the user, oldest first; one row per user, user ids unique)
      train/part-*.parquet           user_id, <profile columns>, hist_begin, hist_end, target_item_id,
      test/part-*.parquet            target_cate_id, target_timestamp, label
      frequencies.npz, item_features.npz, vocab/, experiment.yaml
      meta.json                      ..., "layout": "referenced", "histories": "histories"

A sample's history is ``sequence[hist_begin:hist_end]`` of its user (the list columns of the histories table
share names with the flat layout's columns). :class:`ReferencedBehaviorReader` has exactly the constructor
and iteration API of :class:`~din_torchrec.data.reader.BehaviorReader` (rank partitioning over the sample
files' row groups, shuffle buffer, ``drop_last``/``pad_last``, ``max_history``, negatives, frequencies and
``reg_weights``) and yields the same :class:`~din_torchrec.data.batch.Batch` as the flat reader on the flat
twin of the data. It holds the histories table in memory as numpy offsets/values (ids downcast to int32
when they fit; loaded one row group at a time), the shuffle buffer holds only each row's reference (start
cell and kept length, after ``max_history``), and the cells are gathered when a batch is assembled: no
per-sample history exists beyond the batch being built.

:func:`open_reader` picks the reader from ``meta.json``'s ``"layout"`` (``flat`` when absent).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from din_torchrec.config import FeaturesConfig
from din_torchrec.data.batch import Batch
from din_torchrec.data.negatives import NegativeSampler
from din_torchrec.data.reader import (
    _ARROW_ERRORS,
    BehaviorReader,
    _open_footer,
    _ranges,
    _Rows,
    find_parquet_files,
)
from din_torchrec.data.validation import (
    DataError,
    check_equal_lengths,
    check_ids,
    check_labels,
    check_no_nulls,
    check_schema,
    where,
)

__all__ = [
    "HISTORIES_DIR",
    "HIST_BEGIN",
    "HIST_END",
    "LAYOUT_FLAT",
    "LAYOUT_REFERENCED",
    "Histories",
    "ReferencedBehaviorReader",
    "dataset_layout",
    "find_dataset_meta",
    "open_reader",
]

# Keys of the references in the reader's row blocks (never column names of a file).
_REF_START, _REF_LENGTH = "\0history_start", "\0history_length"

HIST_BEGIN = "hist_begin"
HIST_END = "hist_end"
HISTORIES_DIR = "histories"
LAYOUT_FLAT = "flat"
LAYOUT_REFERENCED = "referenced"


# --------------------------------------------------------------------------------------------------------
# Finding the dataset description
# --------------------------------------------------------------------------------------------------------


def find_dataset_meta(path: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The ``meta.json`` describing ``path`` (a dataset folder, a split folder or a part file):
    ``(dataset folder, parsed meta)``, looking in ``path`` and up to two parents; None when there is none.

    Raises:
        DataError: a ``meta.json`` exists but is not a JSON object.
    """
    p = Path(path)
    candidates = ([p] if p.is_dir() else []) + [p.parent, p.parent.parent]
    for d in candidates:
        m = d / "meta.json"
        if m.is_file():
            try:
                meta = json.loads(m.read_text())
            except (OSError, ValueError) as e:
                raise DataError(f"{m}: cannot read the dataset description ({type(e).__name__}: {e})") from e
            if not isinstance(meta, dict):
                raise DataError(f"{m}: expected a JSON object, got {type(meta).__name__}")
            return d, meta
    return None


def dataset_layout(path: str | Path) -> str:
    """``"flat"`` or ``"referenced"``: ``meta.json``'s ``"layout"`` for ``path`` (flat when absent)."""
    found = find_dataset_meta(path)
    if found is None:
        return LAYOUT_FLAT
    root, meta = found
    layout = meta.get("layout") or LAYOUT_FLAT
    if layout not in (LAYOUT_FLAT, LAYOUT_REFERENCED):
        raise DataError(
            f'{root / "meta.json"}: "layout": expected {LAYOUT_FLAT!r} or {LAYOUT_REFERENCED!r}, got {layout!r}'
        )
    return layout


def open_reader(
    path_or_split_dir: str | Path, features: FeaturesConfig, **kwargs: Any
) -> BehaviorReader | ReferencedBehaviorReader:
    """The reader for ``path_or_split_dir`` (e.g. ``<data.dir>/train``): :class:`ReferencedBehaviorReader`
    when its dataset's ``meta.json`` says ``"layout": "referenced"``, else :class:`BehaviorReader`.

    ``kwargs`` are the readers' common keyword arguments (``max_history``, ``batch_size``, ``rank``, ...).
    """
    if dataset_layout(path_or_split_dir) == LAYOUT_REFERENCED:
        return ReferencedBehaviorReader(path_or_split_dir, features, **kwargs)
    kwargs.pop("histories", None)
    return BehaviorReader(path_or_split_dir, features, **kwargs)


# --------------------------------------------------------------------------------------------------------
# The histories table
# --------------------------------------------------------------------------------------------------------


def _compact(values: np.ndarray) -> np.ndarray:
    """An owned copy (never a view of arrow memory), int32 when every value fits, else int64."""
    info = np.iinfo(np.int32)
    fits = values.size == 0 or (values.min() >= info.min and values.max() <= info.max)
    return np.array(values, dtype=np.int32 if fits else np.int64, copy=True)


class Histories:
    """Every user's behaviour sequence, in memory as one offsets array and one values array per column.

    Args:
        path: the histories folder (or one parquet file).
        features: which list columns to load (every sequence table's ``history_column`` and the
            ``timestamp_column``), keyed by ``user_column``; ids are checked against the table sizes.

    Raises:
        DataError: naming the file (column, row) on a missing column, wrong type, null, unequal list lengths,
            out-of-range id or repeated user.
    """

    def __init__(self, path: str | Path, features: FeaturesConfig) -> None:
        self.path = Path(path)
        user_col = features.user_column
        hist_tables = {t.history_column: (t.name, t.num_embeddings) for t in features.sequence}
        self.columns = [t.history_column for t in features.sequence] + [features.timestamp_column]
        users: list[np.ndarray] = []
        lengths: list[np.ndarray] = []
        values: dict[str, list[np.ndarray]] = {c: [] for c in self.columns}
        where_of_user: list[tuple[Path, int, int]] = []  # (file, first file row, rows) per chunk
        for f in find_parquet_files(self.path):
            md, schema = _open_footer(f)
            self._check_schema(f, schema, user_col)
            pf = pq.ParquetFile(f, metadata=md)
            row = 0
            # One row group at a time, single-threaded: the decoded int64 buffers of a row group are freed
            # once its compact numpy copy exists, and the pool hands them back at the end, so the resident
            # size stays close to the compact arrays (decoding whole files kept ~3x that).
            for rg in range(md.num_row_groups):
                try:
                    table = pf.read_row_group(rg, columns=[user_col, *self.columns], use_threads=False)
                except _ARROW_ERRORS as e:
                    raise DataError(
                        f"{f}: row group {rg}: cannot read parquet data (corrupt or truncated file?) ({e})"
                    ) from e
                arr = table.column(user_col).combine_chunks()
                check_no_nulls(f, user_col, arr, row)
                users.append(arr.to_numpy().astype(np.int64))
                lens = []
                for c in self.columns:
                    arr = table.column(c).combine_chunks()
                    check_no_nulls(f, c, arr, row)
                    off = np.asarray(arr.offsets).astype(np.int64)
                    vals = arr.values.slice(int(off[0]), int(off[-1] - off[0])).to_numpy()
                    off -= off[0]
                    if c in hist_tables:
                        check_ids(f, c, vals, hist_tables[c][1], hist_tables[c][0], row, offsets=off)
                    values[c].append(_compact(vals))
                    lens.append(np.diff(off))
                del table, arr, vals
                check_equal_lengths(f, self.columns, lens, row)
                lengths.append(lens[0])
                where_of_user.append((f, row, len(lens[0])))
                row += len(lens[0])
        pa.default_memory_pool().release_unused()
        user = np.concatenate(users) if users else np.zeros(0, dtype=np.int64)
        if user.size and user.min() < 0:
            raise DataError(f"{self.path}: column {user_col!r}: expected non-negative user ids")
        size = int(user.max()) + 1 if user.size else 0
        self.row_of_user = np.full(size, -1, dtype=np.int64)
        self.row_of_user[user] = np.arange(len(user))
        if np.count_nonzero(self.row_of_user >= 0) != len(user):
            _, first, counts = np.unique(user, return_index=True, return_counts=True)
            dup = int(first[np.flatnonzero(counts > 1)[0]])
            # The second occurrence names the row.
            second = int(np.flatnonzero(user == user[dup])[1])
            f, row = self._locate(where_of_user, second)
            raise DataError(f"{where(f, user_col, row)}: user {int(user[dup])} has more than one sequence")
        length = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
        self.lengths = length
        self.offsets = np.zeros(len(length) + 1, dtype=np.int64)
        np.cumsum(length, out=self.offsets[1:])
        self.values = {
            c: (v[0] if len(v) == 1 else np.concatenate(v) if v else np.zeros(0, dtype=np.int64))
            for c, v in values.items()
        }
        self.num_users = len(user)

    def _check_schema(self, file: Path, schema: pa.Schema, user_col: str) -> None:
        present = schema.names
        for col in [user_col, *self.columns]:
            if col not in present:
                raise DataError(f"{where(file, col)}: missing column; the file has columns {present}")
        if not pa.types.is_integer(schema.field(user_col).type):
            raise DataError(
                f"{where(file, user_col)}: expected an integer column, got arrow type {schema.field(user_col).type}"
            )
        for col in self.columns:
            tp = schema.field(col).type
            if not (
                (pa.types.is_list(tp) or pa.types.is_large_list(tp)) and pa.types.is_integer(tp.value_type)
            ):
                raise DataError(f"{where(file, col)}: expected a list<integer> column, got arrow type {tp}")

    @staticmethod
    def _locate(chunks: list[tuple[Path, int, int]], index: int) -> tuple[Path, int]:
        for f, first, n in chunks:
            if index < n:
                return f, first + index
            index -= n
        raise IndexError(index)  # pragma: no cover

    @property
    def nbytes(self) -> int:
        """Resident bytes of the arrays."""
        return int(
            self.row_of_user.nbytes
            + self.offsets.nbytes
            + self.lengths.nbytes
            + sum(v.nbytes for v in self.values.values())
        )


# --------------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------------


class ReferencedBehaviorReader(BehaviorReader):
    """:class:`~din_torchrec.data.reader.BehaviorReader` over the ``referenced`` layout (module docstring).

    The arguments, their checks, :meth:`num_batches`, :meth:`set_epoch` and the iteration are those of
    :class:`BehaviorReader`; the sample files hold ``hist_begin``/``hist_end`` instead of the list columns.

    Args:
        histories: the histories folder; default: ``meta.json``'s ``"histories"`` beside the split (found as
            in :func:`find_dataset_meta`), else a ``histories`` folder beside the split folder.
        (everything else): as :class:`BehaviorReader`.

    Raises:
        DataError: as :class:`BehaviorReader`, plus: no histories folder, a sample whose user has no sequence
            or whose ``hist_begin``/``hist_end`` fall outside it (named by file, column and row).
    """

    def __init__(
        self,
        path: str | Path,
        features: FeaturesConfig,
        *,
        max_history: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle_buffer: int = 0,
        seed: int = 0,
        drop_last: bool = True,
        pad_last: bool = False,
        frequencies: dict[str, np.ndarray] | None = None,
        reg_mode: str = "count",
        read_chunk_rows: int = 65536,
        negatives: NegativeSampler | None = None,
        histories: str | Path | Histories | None = None,
        cache_in_memory: bool = False,
    ) -> None:
        super().__init__(
            path,
            features,
            max_history=max_history,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            shuffle_buffer=shuffle_buffer,
            seed=seed,
            drop_last=drop_last,
            pad_last=pad_last,
            frequencies=frequencies,
            reg_mode=reg_mode,
            read_chunk_rows=read_chunk_rows,
            negatives=negatives,
            cache_in_memory=cache_in_memory,
        )
        if isinstance(histories, Histories):
            self.histories = histories
        else:
            self.histories = Histories(self._histories_path(histories), features)

    # Only the columns read from the sample files differ from the flat layout: references, not lists.
    def _sample_columns(self) -> list[str]:
        return [*self._scalar_int_columns, HIST_BEGIN, HIST_END, self.features.label_column]

    def _check_path(self) -> None:
        if (self.path / "meta.json").is_file():
            raise DataError(
                f"{self.path}: a dataset folder (it holds meta.json); pass one of its split folders, e.g. "
                f"{self.path / 'train'}"
            )

    def _check_schema(self, file: Path, schema: pa.Schema) -> None:
        check_schema(
            file, schema, [*self._scalar_int_columns, HIST_BEGIN, HIST_END], [], self.features.label_column
        )

    def _histories_path(self, given: str | Path | None) -> Path:
        if given is not None:
            return Path(given)
        found = find_dataset_meta(self.path)
        if found is not None:
            root, meta = found
            name = meta.get("histories") or HISTORIES_DIR
            return root / name
        split_dir = self.path if self.path.is_dir() else self.path.parent
        guess = split_dir.parent / HISTORIES_DIR
        if not guess.exists():
            raise DataError(
                f"{self.path}: referenced layout, but no histories folder: expected {guess} or a meta.json "
                f'naming it ("histories")'
            )
        return guess

    def _convert(self, rb: pa.RecordBatch, file: Path, first_row: int) -> _Rows:
        """Validate one record batch of sample rows and gather its (truncated) histories."""
        f = self.features
        dense: dict[str, np.ndarray] = {}
        sizes = {c: (t, n) for c, t, n in self._id_columns}
        for col in self._scalar_int_columns:
            arr = rb.column(col)
            check_no_nulls(file, col, arr, first_row)
            values = arr.to_numpy()
            if col in sizes:
                table, n = sizes[col]
                check_ids(file, col, values, n, table, first_row)
            dense[col] = values.astype(np.int64)
        label_arr = rb.column(f.label_column)
        check_no_nulls(file, f.label_column, label_arr, first_row)
        labels = label_arr.to_numpy(zero_copy_only=False)
        check_labels(file, f.label_column, labels, first_row)
        dense[f.label_column] = labels.astype(np.float32)

        refs = {}
        for col in (HIST_BEGIN, HIST_END):
            arr = rb.column(col)
            check_no_nulls(file, col, arr, first_row)
            refs[col] = arr.to_numpy().astype(np.int64)
        begin, end = refs[HIST_BEGIN], refs[HIST_END]
        h = self.histories
        user = dense[f.user_column]
        known = (user >= 0) & (user < len(h.row_of_user))
        row = np.full(len(user), -1, dtype=np.int64)
        row[known] = h.row_of_user[user[known]]
        if (row < 0).any():
            i = int(np.flatnonzero(row < 0)[0])
            raise DataError(
                f"{where(file, f.user_column, first_row + i)}: user {int(user[i])} has no sequence in {h.path}"
            )
        seq_len = h.lengths[row]
        bad = (begin < 0) | (begin > end) | (end > seq_len)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{where(file, HIST_END, first_row + i)}: expected 0 <= {HIST_BEGIN} <= {HIST_END} <= "
                f"{int(seq_len[i])} (the length of user {int(user[i])}'s sequence in {h.path}), got "
                f"{int(begin[i])}..{int(end[i])}"
            )
        # Only the references travel through the shuffle buffer: the rows carry no history cells (length 0
        # for _Rows' bookkeeping) and _build gathers the cells of the B rows of each batch.
        kept = np.minimum(end - begin, self.max_history)
        dense[_REF_START] = h.offsets[row] + end - kept
        dense[_REF_LENGTH] = kept
        return _Rows(dense=dense, lengths=np.zeros(len(kept), dtype=np.int64), jagged={})

    def _build(self, rows: _Rows, valid: np.ndarray, neg_rng: np.random.Generator | None = None) -> Batch:
        """Gather the histories of the batch's rows, then assemble it as :class:`BehaviorReader` does."""
        kept = rows.dense[_REF_LENGTH]
        gather = _ranges(rows.dense[_REF_START], kept)
        values = self.histories.values
        jagged = {c: values[c][gather].astype(np.int64) for c in self._list_columns}
        return super()._build(_Rows(dense=rows.dense, lengths=kept, jagged=jagged), valid, neg_rng)
