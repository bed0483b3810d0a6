"""From behaviours with contiguous ids to a dataset folder: protocols, negatives, layouts, side files.

Every source converter (``amazon``, ``movielens``, ``taobao``) parses its files into a :class:`SourceData`
(one entry per behaviour, ids already mapped to ``1..N``) and calls :func:`write_dataset`, which applies the
same steps to all of them:

1. **Sequences.** Behaviours are sorted by ``(user, timestamp)``, ties kept in input order (a stable sort),
   so each user's behaviours form one contiguous, time-ordered run. Unless ``keep_repeats``, only the first
   (earliest) behaviour of each ``(user, item)`` pair is kept: a history then never holds its own target
   item, and a user's later re-clicks of an item do not become targets.
2. **Protocol** (``k`` = 0-based position in the user's sequence of ``T`` behaviours; the sample with target
   position ``k`` has the history ``b_0 .. b_{k-1}``, the last ``max_history`` of them when that is set):

   * ``din`` (DIN paper, Amazon): one positive per ``k >= 1`` (target = ``b_k``, label 1) and one negative
     with the same history and target timestamp (label 0); ``k = T-1`` (the last behaviour) goes to test,
     ``1 <= k <= T-2`` to train. A user with ``T >= 2`` has exactly one test pair; ``T = 1`` yields nothing.
   * ``dien`` (DIEN paper's Amazon set-up): one pair per user and split: train ``k = T-2`` (when
     ``T >= 3``), test ``k = T-1`` (when ``T >= 2``).

   Negatives are drawn uniformly from the items ``1..V`` the user has **no** behaviour on (in the whole
   sequence, test included), with the random stream ``(seed, 0)``; the train pairs are then shuffled with
   the stream ``(seed, 1)`` (the test split stays in user order, positive before negative).
3. **Layout.** ``referenced`` (default): each user's sequence is written once to ``histories/`` and a sample
   row holds ``hist_begin``/``hist_end`` (positions in that sequence) instead of lists (see
   :mod:`din_torchrec.data.referenced`). ``flat``: every row carries its own ``hist_*`` lists, exactly the
   columns of ``docs/data_format.md``.
4. **Side files.** ``frequencies.npz`` (train split only: item/category each history position and each
   target, profile tables one per sample), ``item_features.npz`` (``category`` of every item),
   ``vocab/<table>.parquet`` (``id``, ``raw``: the raw value of every id), ``experiment.yaml`` (a config
   that trains on the folder) and ``meta.json`` (last; removed when a run starts, so a folder with a
   ``meta.json`` is complete).

Everything is vectorised numpy over the behaviour arrays (no Python loop per behaviour or sample), the
output is written in row groups, and a fixed seed gives byte-identical files run to run.
"""

from __future__ import annotations

import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from din_torchrec.config import (
    ExperimentConfig,
    ProfileTableConfig,
    SequenceTableConfig,
    dump_config,
)
from din_torchrec.data.prepare.errors import ErrorLog, PrepareError
from din_torchrec.data.reader import _ranges
from din_torchrec.data.referenced import HIST_BEGIN, HIST_END, HISTORIES_DIR
from din_torchrec.utils.io import atomic_replace_dir, atomic_write_json, atomic_write_text, atomic_write_with

__all__ = [
    "LAYOUTS",
    "PROTOCOLS",
    "ProfileColumn",
    "SourceData",
    "TrainingHints",
    "Interner",
    "encode_ids",
    "save_npz",
    "write_dataset",
]

SCHEMA_VERSION = 1
PROTOCOLS: tuple[str, ...] = ("din", "dien")
LAYOUTS: tuple[str, ...] = ("referenced", "flat")

_NEG_STREAM, _SHUFFLE_STREAM = 0, 1
_MAX_REJECTION_ROUNDS = 64
_NEG_CHUNK = 1 << 22
_MAX_CELLS_PER_WRITE = 1 << 30  # list offsets are int32

PROTOCOL_TEXT = {
    "din": (
        "per user, behaviours in time order b_0..b_{T-1}; for every k >= 1 a positive (history b_0..b_{k-1}, "
        "target b_k) and a negative (same history and timestamp, an item the user has no behaviour on, "
        "uniform); k = T-1 -> test, 1 <= k <= T-2 -> train"
    ),
    "dien": (
        "per user, behaviours in time order b_0..b_{T-1}; train: the pair (positive + negative) with target "
        "b_{T-2} and history b_0..b_{T-3} (users with T >= 3); test: the pair with target b_{T-1} and history "
        "b_0..b_{T-2} (users with T >= 2); negatives uniform over the items the user has no behaviour on"
    ),
}


# --------------------------------------------------------------------------------------------------------
# What a source hands over
# --------------------------------------------------------------------------------------------------------


@dataclass
class ProfileColumn:
    """A user-profile id column: ``values[u]`` is user ``u``'s id in table ``table`` (``values[0]`` unused)."""

    table: str
    values: np.ndarray
    num_embeddings: int
    vocab: Sequence[Any]  # raw value of ids 0..num_embeddings-1


@dataclass
class TrainingHints:
    """Source-specific defaults of the ``experiment.yaml`` written beside the data."""

    embedding_dim: int = 32
    max_history: int = 100
    batch_size: int = 1024
    eval_batch_size: int = 4096
    model: str = "din"
    comment: str = ""


@dataclass
class SourceData:
    """Behaviours of one source with contiguous ids (0 reserved), in input order.

    Attributes:
        name: dataset name (``amazon``, ``movielens-1m``, ``taobao``); the run folder of the experiment.
        user, item: ``[n]`` integer ids ``1..U`` and ``1..V``.
        timestamp: ``[n]`` int64 unix seconds.
        item_category: ``[V + 1]`` category id ``1..C`` of every item (index 0 holds 0).
        vocab: table -> raw value of ids ``1..N`` (``user``, ``item``, ``category``).
        profile: extra profile column -> :class:`ProfileColumn` (``user_id`` is always written).
        files: role -> input path (for ``meta.json``).
        counts: source statistics for ``meta.json`` (lines read, ...).
        ignored: documented, expected drops (not errors), e.g. ratings under the threshold.
        options: source options for ``meta.json``.
        hints: defaults of the ``experiment.yaml``.
        category_rule: how the category of an item was chosen (for ``meta.json``).
    """

    name: str
    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    item_category: np.ndarray
    vocab: dict[str, Sequence[Any]]
    profile: dict[str, ProfileColumn] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    ignored: dict[str, int] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    hints: TrainingHints = field(default_factory=TrainingHints)
    category_rule: str = ""

    @property
    def num_users(self) -> int:
        return len(self.vocab["user"])

    @property
    def num_items(self) -> int:
        return len(self.vocab["item"])

    @property
    def num_categories(self) -> int:
        return len(self.vocab["category"])


def encode_ids(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous ids ``1..N`` in sorted order of the raw values: ``(ids [n] int32/int64, sorted uniques)``."""
    uniq, inverse = np.unique(raw, return_inverse=True)
    ids = inverse.reshape(-1) + 1
    dtype = np.int32 if len(uniq) < np.iinfo(np.int32).max else np.int64
    return ids.astype(dtype, copy=False), uniq


class Interner:
    """Codes of raw values in order of first appearance, remapped at the end to ids ``1..N`` in sorted order.

    Parsing loops call :meth:`code` per line (a dict lookup, no list of raw strings kept per line); then
    :meth:`ids` turns the collected codes into contiguous ids sorted by raw value, so the ids do not depend on
    the order of the input lines.
    """

    def __init__(self) -> None:
        self._codes: dict[Any, int] = {}

    def code(self, raw: Any) -> int:
        """The first-appearance code of ``raw`` (0-based)."""
        return self._codes.setdefault(raw, len(self._codes))

    def __len__(self) -> int:
        return len(self._codes)

    def __contains__(self, raw: Any) -> bool:
        return raw in self._codes

    def raw_values(self) -> list[Any]:
        """Raw value of every code."""
        out: list[Any] = [None] * len(self._codes)
        for raw, code in self._codes.items():
            out[code] = raw
        return out

    def ids(self, codes: np.ndarray) -> tuple[np.ndarray, list[Any]]:
        """``(ids [n] int64, vocab)`` over the codes present in ``codes`` (a subset of the codes handed out):
        contiguous ids ``1..N`` in sorted order of the raw values, id ``i`` being ``vocab[i - 1]``."""
        codes = np.asarray(codes, dtype=np.int64)
        present = np.unique(codes)
        raw = self.raw_values()
        values = [raw[c] for c in present.tolist()]
        order = sorted(range(len(values)), key=values.__getitem__)
        rank = np.zeros(len(raw), dtype=np.int64)
        rank[present[np.asarray(order, dtype=np.int64)]] = np.arange(1, len(values) + 1, dtype=np.int64)
        return rank[codes], [values[j] for j in order]


# --------------------------------------------------------------------------------------------------------
# Deterministic side files
# --------------------------------------------------------------------------------------------------------


def save_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` with fixed zip timestamps (``np.savez`` stamps the current time, so its bytes differ
    run to run), written atomically; ``np.load`` reads it as usual."""

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)

    return _shared(atomic_write_with(path, write, suffix=".npz"))


def _shared(path: Path) -> Path:
    """Mode 0644 (rw-r--r--): the atomic writes go through ``mkstemp``, which creates files readable by their
    owner only, and a dataset folder is usually shared."""
    path.chmod(0o644)
    return path


def _fresh_dir(path: Path) -> None:
    """An empty folder at ``path`` (a leftover of an interrupted run is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def _vocab_table(raw: Sequence[Any], first_id: int) -> pa.Table:
    arr = pa.array(list(raw) if not isinstance(raw, np.ndarray) else raw)
    if pa.types.is_integer(arr.type):
        arr = arr.cast(pa.int64())
    ids = pa.array(np.arange(first_id, first_id + len(arr), dtype=np.int64))
    return pa.table({"id": ids, "raw": arr})


# --------------------------------------------------------------------------------------------------------
# Sequences, protocol, negatives
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Sequences:
    """Behaviours grouped by user, time-ordered: user ``u`` owns positions ``offsets[u]:offsets[u+1]``."""

    user: np.ndarray
    item: np.ndarray
    cate: np.ndarray
    ts: np.ndarray
    offsets: np.ndarray  # [U + 2]
    repeats_removed: int

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # [U + 1], entry u = T_u (entry 0 = 0)


def _small(a: np.ndarray) -> np.ndarray:
    """``a`` as int32 when every value fits (ids, and unix seconds before 2038), else int64."""
    info = np.iinfo(np.int32)
    if a.dtype == np.int32 or (a.size and (a.min() < info.min or a.max() > info.max)):
        return a
    return a.astype(np.int32)


def _sequences(src: SourceData, keep_repeats: bool) -> _Sequences:
    """Sort (and dedupe) the behaviours; **consumes** ``src.user/item/timestamp`` (set to empty arrays)."""
    user, item, ts = src.user, src.item, src.timestamp
    src.user = src.item = src.timestamp = np.zeros(0, dtype=np.int64)
    order = np.lexsort((ts, user))  # stable: equal (user, ts) keep their input order
    user = _small(user[order])
    item = _small(item[order])
    ts = _small(ts[order])
    del order
    removed = 0
    if not keep_repeats and len(user):
        key = user.astype(np.int64) * (src.num_items + 1) + item
        _, first = np.unique(key, return_index=True)
        del key
        keep = np.zeros(len(user), dtype=bool)
        keep[first] = True
        removed = int(len(user) - len(first))
        if removed:
            user, item, ts = user[keep], item[keep], ts[keep]
    counts = np.bincount(user, minlength=src.num_users + 1)
    offsets = np.zeros(src.num_users + 2, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    cate = _small(src.item_category[item])
    return _Sequences(user, item, cate, ts, offsets, removed)


def _protocol_positions(seq: _Sequences, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """Global target positions of the train and the test pairs (ascending)."""
    local = np.arange(len(seq.user), dtype=np.int64) - seq.offsets[seq.user]
    total = seq.lengths[seq.user]
    if protocol == "din":
        train = (local >= 1) & (local <= total - 2)
    elif protocol == "dien":
        train = (local >= 1) & (local == total - 2)
    else:
        raise ValueError(f"protocol: expected one of {list(PROTOCOLS)}, got {protocol!r}")
    test = (local >= 1) & (local == total - 1)
    return np.flatnonzero(train), np.flatnonzero(test)


def _draw_negatives(
    seq: _Sequences, users: np.ndarray, num_items: int, rng: np.random.Generator, user_vocab: Sequence[Any]
) -> np.ndarray:
    """One item per entry of ``users``, uniform over ``1..num_items`` minus the user's items (any position)."""
    width = num_items + 1
    owned = seq.user.astype(np.int64) * width + seq.item  # (user, item) keys, sorted in place below
    owned.sort()
    if len(owned) > 1 and not (owned[1:] != owned[:-1]).all():  # repeats kept: unique keys only
        owned = owned[np.concatenate(([True], owned[1:] != owned[:-1]))]
    bounds = np.searchsorted(owned, np.arange(len(seq.offsets), dtype=np.int64) * width)
    distinct = np.diff(bounds)  # [U + 1]: distinct items of every user id
    del bounds
    full = np.flatnonzero(distinct[users] >= num_items)
    if full.size:
        u = int(users[full[0]])
        raise PrepareError(
            f"user {user_vocab[u - 1]!r} has a behaviour on every one of the {num_items} items: no negative "
            f"item exists for its samples (the protocol needs an item the user never interacted with)"
        )
    out = np.empty(len(users), dtype=np.int32 if width <= np.iinfo(np.int32).max else np.int64)
    left: list[np.ndarray] = []
    # In chunks of a fixed size (the draws do not depend on anything else), to bound the temporaries.
    for lo in range(0, len(users), _NEG_CHUNK):
        hi = min(len(users), lo + _NEG_CHUNK)
        base = users[lo:hi].astype(np.int64) * width
        draw = rng.integers(1, width, size=hi - lo, dtype=np.int64)
        todo = np.arange(hi - lo)
        for _ in range(_MAX_REJECTION_ROUNDS):
            keys = base[todo] + draw[todo]
            idx = np.minimum(np.searchsorted(owned, keys), len(owned) - 1)
            todo = todo[owned[idx] == keys]
            if not todo.size:
                break
            draw[todo] = rng.integers(1, width, size=todo.size, dtype=np.int64)
        out[lo:hi] = draw
        if todo.size:
            left.append(todo + lo)
    todo = np.concatenate(left) if left else np.zeros(0, dtype=np.int64)
    # Users owning almost every item: draw from the exact complement (a few samples; same distribution).
    for i in todo:
        u = int(users[i])
        mine = owned[np.searchsorted(owned, u * width) : np.searchsorted(owned, (u + 1) * width)] - u * width
        free = np.setdiff1d(np.arange(1, width, dtype=np.int64), mine, assume_unique=True)
        out[i] = free[rng.integers(0, free.size)]
    return out


# --------------------------------------------------------------------------------------------------------
# Writing the splits
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Split:
    """``m`` pairs (target position, negative item); sample row ``r`` of the split is pair ``rows[r] // 2``,
    the positive when ``rows[r]`` is even."""

    positions: np.ndarray
    negatives: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)


def _sample_schema(profile: dict[str, ProfileColumn], layout: str) -> pa.Schema:
    fields = [pa.field("user_id", pa.int64())]
    fields += [pa.field(c, pa.int64()) for c in profile]
    if layout == "flat":
        fields += [
            pa.field("hist_item_ids", pa.list_(pa.int64())),
            pa.field("hist_cate_ids", pa.list_(pa.int64())),
            pa.field("hist_timestamps", pa.list_(pa.int64())),
        ]
    else:
        fields += [pa.field(HIST_BEGIN, pa.int32()), pa.field(HIST_END, pa.int32())]
    fields += [
        pa.field("target_item_id", pa.int64()),
        pa.field("target_cate_id", pa.int64()),
        pa.field("target_timestamp", pa.int64()),
        pa.field("label", pa.float32()),
    ]
    return pa.schema(fields)


def _list(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int64)))


def _sample_table(
    rows: np.ndarray,
    split: _Split,
    seq: _Sequences,
    src: SourceData,
    layout: str,
    max_history: int,
    schema: pa.Schema,
) -> pa.Table:
    pair = rows // 2
    positive = rows % 2 == 0
    pos = split.positions[pair]
    user = seq.user[pos].astype(np.int64)
    end = pos - seq.offsets[user]
    begin = np.maximum(end - max_history, 0) if max_history > 0 else np.zeros_like(end)
    target = np.where(positive, seq.item[pos], split.negatives[pair]).astype(np.int64)
    cols: dict[str, Any] = {"user_id": user}
    for c, p in src.profile.items():
        cols[c] = p.values[user].astype(np.int64)
    if layout == "flat":
        lengths = end - begin
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        gather = _ranges(seq.offsets[user] + begin, lengths)
        cols["hist_item_ids"] = _list(offsets, seq.item[gather])
        cols["hist_cate_ids"] = _list(offsets, seq.cate[gather])
        cols["hist_timestamps"] = _list(offsets, seq.ts[gather])
    else:
        cols[HIST_BEGIN] = begin.astype(np.int32)
        cols[HIST_END] = end.astype(np.int32)
    cols["target_item_id"] = target
    cols["target_cate_id"] = src.item_category[target].astype(np.int64)
    cols["target_timestamp"] = seq.ts[pos].astype(np.int64)
    cols["label"] = positive.astype(np.float32)
    return pa.table(cols, schema=schema)


def _row_pieces(split: _Split, seq: _Sequences, start: int, stop: int, layout: str, max_history: int):
    """``[start, stop)`` cut so that a flat piece holds fewer than 2^30 history cells (int32 offsets)."""
    if layout != "flat" or stop - start <= 1:
        return [(start, stop)]
    pos = split.positions[split.rows[start:stop] // 2]
    lengths = pos - seq.offsets[seq.user[pos]]
    if max_history > 0:
        lengths = np.minimum(lengths, max_history)
    if int(lengths.sum()) < _MAX_CELLS_PER_WRITE:
        return [(start, stop)]
    mid = (start + stop) // 2
    return _row_pieces(split, seq, start, mid, layout, max_history) + _row_pieces(
        split, seq, mid, stop, layout, max_history
    )


def _write_split(
    out: Path,
    name: str,
    split: _Split,
    seq: _Sequences,
    src: SourceData,
    layout: str,
    max_history: int,
    rows_per_file: int,
    row_group_size: int,
) -> None:
    """``out/name/part-NNNNN.parquet``, assembled in a temporary folder that then replaces ``out/name``."""
    schema = _sample_schema(src.profile, layout)
    tmp = out / f".{name}.tmp"
    _fresh_dir(tmp)
    n = len(split)
    n_files = max(1, -(-n // rows_per_file))
    for i in range(n_files):
        lo, hi = i * rows_per_file, min(n, (i + 1) * rows_per_file)
        with pq.ParquetWriter(tmp / f"part-{i:05d}.parquet", schema, compression="zstd") as writer:
            if hi <= lo:
                writer.write_table(schema.empty_table())
            for s in range(lo, hi, row_group_size):
                for a, b in _row_pieces(split, seq, s, min(hi, s + row_group_size), layout, max_history):
                    table = _sample_table(split.rows[a:b], split, seq, src, layout, max_history, schema)
                    writer.write_table(table, row_group_size=row_group_size)
    atomic_replace_dir(tmp, out / name)


def _write_histories(out: Path, seq: _Sequences, row_group_size: int) -> None:
    """``out/histories/part-00000.parquet``: one row per user id ``1..U``, the whole sequence, oldest first."""
    schema = pa.schema(
        [
            pa.field("user_id", pa.int64()),
            pa.field("hist_item_ids", pa.list_(pa.int64())),
            pa.field("hist_cate_ids", pa.list_(pa.int64())),
            pa.field("hist_timestamps", pa.list_(pa.int64())),
        ]
    )
    tmp = out / f".{HISTORIES_DIR}.tmp"
    _fresh_dir(tmp)
    num_users = len(seq.offsets) - 2
    with pq.ParquetWriter(tmp / "part-00000.parquet", schema, compression="zstd") as writer:
        u = 1
        while u <= num_users:
            # Row groups of ~row_group_size users, fewer when that would exceed the int32 list offsets.
            v = min(num_users + 1, u + row_group_size)
            while v > u + 1 and seq.offsets[v] - seq.offsets[u] >= _MAX_CELLS_PER_WRITE:
                v = u + max(1, (v - u) // 2)
            a, b = int(seq.offsets[u]), int(seq.offsets[v])
            off = seq.offsets[u : v + 1] - a
            table = pa.table(
                {
                    "user_id": np.arange(u, v, dtype=np.int64),
                    "hist_item_ids": _list(off, seq.item[a:b]),
                    "hist_cate_ids": _list(off, seq.cate[a:b]),
                    "hist_timestamps": _list(off, seq.ts[a:b]),
                },
                schema=schema,
            )
            writer.write_table(table, row_group_size=row_group_size)
            u = v
    atomic_replace_dir(tmp, out / HISTORIES_DIR)


def _frequencies(seq: _Sequences, train: _Split, src: SourceData, max_history: int) -> dict[str, np.ndarray]:
    """Counts over the train split (docs/data_format.md), without materialising any history.

    Both samples of a pair share the user and the history, so the counts are taken per pair: twice the
    history coverage and the user, once each target (the positive's and the negative's).
    """
    pos = train.positions
    n = len(seq.user)
    user = seq.user[pos]
    length = pos - seq.offsets[user]  # the history of target position pos is [pos - length, pos)
    if max_history > 0:
        np.minimum(length, max_history, out=length)
    # Coverage of every behaviour position by the train histories: +1 at each history start, -1 at its end.
    cover = np.bincount(pos - length, minlength=n + 1) - np.bincount(pos, minlength=n + 1)
    del length
    cover = 2 * np.cumsum(cover)[:n]
    v, c, u = src.num_items + 1, src.num_categories + 1, src.num_users + 1
    targets = seq.item[pos]
    item = np.bincount(seq.item, weights=cover, minlength=v).round().astype(np.int64)
    item += np.bincount(targets, minlength=v) + np.bincount(train.negatives, minlength=v)
    cate = np.bincount(seq.cate, weights=cover, minlength=c).round().astype(np.int64)
    cate += np.bincount(seq.cate[pos], minlength=c) + np.bincount(
        src.item_category[train.negatives], minlength=c
    )
    per_user = 2 * np.bincount(user, minlength=u).astype(np.int64)
    out = {"item": item, "category": cate, "user": per_user}
    for p in src.profile.values():
        out[p.table] = (
            np.bincount(p.values, weights=per_user, minlength=p.num_embeddings).round().astype(np.int64)
        )
    return out


# --------------------------------------------------------------------------------------------------------
# experiment.yaml
# --------------------------------------------------------------------------------------------------------


def experiment_config(src: SourceData, out: str | Path, max_history: int) -> ExperimentConfig:
    """A ready-to-train config for the prepared folder (tables sized from the vocabularies)."""
    h = src.hints
    cfg = ExperimentConfig()
    cfg.data.dir = str(out)
    cfg.data.max_history = max_history if max_history > 0 else h.max_history
    cfg.data.batch_size = h.batch_size
    cfg.data.eval_batch_size = h.eval_batch_size
    cfg.features.embedding_dim = h.embedding_dim
    cfg.features.sequence = [
        SequenceTableConfig("item", src.num_items + 1, "target_item_id", "hist_item_ids"),
        SequenceTableConfig("category", src.num_categories + 1, "target_cate_id", "hist_cate_ids"),
    ]
    cfg.features.profile = [ProfileTableConfig("user", src.num_users + 1, "user_id")]
    cfg.features.profile += [ProfileTableConfig(p.table, p.num_embeddings, c) for c, p in src.profile.items()]
    cfg.model.name = h.model  # type: ignore[assignment]
    cfg.training.output_dir = f"runs/{src.name}"
    return cfg.validate()


# --------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------


def check_options(protocol: str, layout: str, max_history: int) -> None:
    """The common options, checked before any file is read."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {list(PROTOCOLS)}, got {protocol!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
    if max_history < 0:
        raise ValueError(f"max_history: expected >= 0 (0 keeps every behaviour), got {max_history}")


def write_dataset(
    src: SourceData,
    out: str | Path,
    *,
    log: ErrorLog,
    protocol: str = "din",
    seed: int = 0,
    layout: str = "referenced",
    max_history: int = 0,
    keep_repeats: bool = False,
    rows_per_file: int = 1_000_000,
    row_group_size: int = 65_536,
) -> dict[str, Any]:
    """Write the dataset folder ``out`` from ``src`` (see the module docstring); returns ``meta.json``'s dict.

    Args:
        max_history: keep at most this many most recent behaviours in each sample's history (0: all).
        keep_repeats: keep every behaviour of a repeated ``(user, item)`` pair (default: the first only).
        rows_per_file, row_group_size: how the sample parts are cut.
    """
    check_options(protocol, layout, max_history)
    if rows_per_file <= 0 or row_group_size <= 0:
        raise ValueError("rows_per_file and row_group_size: expected positive integers")
    if src.num_items == 0 or len(src.user) == 0:
        raise PrepareError(
            f"{', '.join(src.files.values())}: no behaviour left to convert (every line was skipped or filtered)"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # the folder is incomplete until meta.json is back

    seq = _sequences(src, keep_repeats)
    train_pos, test_pos = _protocol_positions(seq, protocol)
    if len(test_pos) == 0:
        raise PrepareError(
            f"{', '.join(src.files.values())}: no user has two behaviours, so the protocol makes no sample"
        )
    rng = np.random.default_rng([seed, _NEG_STREAM])
    users = np.concatenate([seq.user[train_pos], seq.user[test_pos]])
    negatives = _draw_negatives(seq, users, src.num_items, rng, src.vocab["user"])
    del users
    train_neg, test_neg = negatives[: len(train_pos)], negatives[len(train_pos) :]
    shuffle = np.random.default_rng([seed, _SHUFFLE_STREAM])
    rows_dtype = np.int32 if 2 * len(train_pos) <= np.iinfo(np.int32).max else np.int64
    train = _Split(train_pos, train_neg, shuffle.permutation(np.arange(2 * len(train_pos), dtype=rows_dtype)))
    test = _Split(test_pos, test_neg, np.arange(2 * len(test_pos), dtype=np.int64))

    for name, split in (("train", train), ("test", test)):
        _write_split(out, name, split, seq, src, layout, max_history, rows_per_file, row_group_size)
    if layout == "referenced":
        _write_histories(out, seq, row_group_size)
    elif (out / HISTORIES_DIR).exists():
        shutil.rmtree(out / HISTORIES_DIR)  # stale, from an earlier referenced run into this folder

    freq = _frequencies(seq, train, src, max_history)
    save_npz(out / "frequencies.npz", freq)
    save_npz(out / "item_features.npz", {"category": src.item_category.astype(np.int64)})

    vocab_tmp = out / ".vocab.tmp"
    _fresh_dir(vocab_tmp)
    tables = {"user": src.vocab["user"], "item": src.vocab["item"], "category": src.vocab["category"]}
    for t, raw in tables.items():
        pq.write_table(_vocab_table(raw, 1), vocab_tmp / f"{t}.parquet", compression="zstd")
    for p in src.profile.values():
        pq.write_table(_vocab_table(p.vocab, 0), vocab_tmp / f"{p.table}.parquet", compression="zstd")
    atomic_replace_dir(vocab_tmp, out / "vocab")

    cfg = experiment_config(src, out, max_history)
    lines = [f"Written by `din-torchrec prepare`: {cfg.model.name} on {src.name} from {out}."]
    lines += [src.hints.comment] if src.hints.comment else []
    lines += ["data.generator is unused for prepared datasets (it configures `din-torchrec generate`)."]
    header = "".join(f"# {line}\n" for line in lines)
    _shared(atomic_write_text(out / "experiment.yaml", header + dump_config(cfg)))

    lengths = seq.lengths[1:]
    meta: dict[str, Any] = {
        "tables": {
            "item": src.num_items + 1,
            "category": src.num_categories + 1,
            "user": src.num_users + 1,
            **{p.table: p.num_embeddings for p in src.profile.values()},
        },
        "rows": {"train": len(train), "test": len(test)},
        "click_rate": {"train": 0.5 if len(train) else 0.0, "test": 0.5},
        "layout": layout,
        "histories": HISTORIES_DIR if layout == "referenced" else None,
        "source": {
            "name": src.name,
            "files": dict(src.files),
            "options": dict(src.options),
            "category": src.category_rule,
        },
        "protocol": {
            "name": protocol,
            "description": PROTOCOL_TEXT[protocol],
            "seed": seed,
            "max_history": max_history,
            "keep_repeats": keep_repeats,
        },
        "counts": {
            **{k: int(v) for k, v in src.counts.items()},
            "behaviors": len(seq.user),
            "users": src.num_users,
            "items": src.num_items,
            "categories": src.num_categories,
            "users_without_samples": int(np.count_nonzero(lengths < 2)),
            "max_sequence_length": int(lengths.max()) if len(lengths) else 0,
            "mean_sequence_length": round(float(lengths.mean()), 3) if len(lengths) else 0.0,
        },
        "ignored": {**{k: int(v) for k, v in src.ignored.items()}, "repeated_user_item": seq.repeats_removed},
        "on_error": log.on_error,
        "skipped": log.summary(),
        "schema_version": SCHEMA_VERSION,
    }
    _shared(atomic_write_json(out / "meta.json", meta))
    return meta
