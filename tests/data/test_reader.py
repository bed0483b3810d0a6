"""Tests of the parquet reader (``din_torchrec.data.reader``) and its input validation.

Every test writes its own small parquet files with pyarrow and checks the batches against a plain-Python
reference built from the same rows (lists and dicts, no numpy tricks), so a reader bug cannot hide behind
the same bug in the reference.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from din_torchrec.config import FeaturesConfig, ProfileTableConfig, SequenceTableConfig
from din_torchrec.data.batch import Batch
from din_torchrec.data.reader import BehaviorReader, DataError, load_frequencies
from din_torchrec.training.regularization import kjt_mba_coefficients
from tests.data.batch_checks import assert_same_batch

ITEMS, CATES, USERS, AGES = 100, 10, 50, 8

FEATURES = FeaturesConfig(
    sequence=[
        SequenceTableConfig("item", ITEMS, "target_item_id", "hist_item_ids"),
        SequenceTableConfig("category", CATES, "target_cate_id", "hist_cate_ids"),
    ],
    profile=[
        ProfileTableConfig("user", USERS, "user_id"),
        ProfileTableConfig("age", AGES, "user_age"),
    ],
)

# Deliberately mixed widths: the reader must accept any integer type and hand out int64.
SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("user_age", pa.int32()),
        ("hist_item_ids", pa.list_(pa.int64())),
        ("hist_cate_ids", pa.list_(pa.int32())),
        ("hist_timestamps", pa.list_(pa.int64())),
        ("target_item_id", pa.int64()),
        ("target_cate_id", pa.int16()),
        ("target_timestamp", pa.int64()),
        ("label", pa.float32()),
        ("extra_ignored", pa.string()),
    ]
)


Row = dict[str, Any]


def make_rows(n: int, seed: int = 0, max_len: int = 9, start_id: int = 0) -> list[Row]:
    """``n`` random rows; ``target_timestamp`` = 1000 * (start_id + i) identifies the row."""
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        length = rnd.randint(0, max_len)
        t0 = rnd.randint(0, 10**6)
        rows.append(
            {
                "user_id": rnd.randrange(USERS),
                "user_age": rnd.randrange(AGES),
                "hist_item_ids": [rnd.randrange(ITEMS) for _ in range(length)],
                "hist_cate_ids": [rnd.randrange(CATES) for _ in range(length)],
                "hist_timestamps": [t0 + 10 * k for k in range(length)],
                "target_item_id": rnd.randrange(ITEMS),
                "target_cate_id": rnd.randrange(CATES),
                "target_timestamp": 1000 * (start_id + i),
                "label": float(rnd.randint(0, 1)),
                "extra_ignored": "x",
            }
        )
    return rows


def write(path: Path, rows: list[Row], schema: pa.Schema = SCHEMA, row_group_size: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=row_group_size)
    return path


def reader(path: Path, **kw: Any) -> BehaviorReader:
    kw.setdefault("max_history", 100)
    kw.setdefault("batch_size", 4)
    return BehaviorReader(path, FEATURES, **kw)


def truncate(row: Row, max_history: int) -> Row:
    """Plain-Python reference of the most-recent-N rule: the last ``max_history`` entries of each list."""
    out = dict(row)
    for col in ("hist_item_ids", "hist_cate_ids", "hist_timestamps"):
        keep = min(len(row[col]), max_history)
        out[col] = row[col][len(row[col]) - keep :]
    return out


FIELDS = [
    "user_id",
    "user_age",
    "hist_item_ids",
    "hist_cate_ids",
    "hist_timestamps",
    "target_item_id",
    "target_cate_id",
    "target_timestamp",
    "label",
]


def batch_rows(batch: Batch) -> list[Row]:
    """Decode a batch back into per-row dicts (plus ``valid``) with plain Python, checking its invariants."""
    b = batch.batch_size
    seq, prof = batch.sequence_features, batch.profile_features
    assert seq.keys() == ["target_item_id", "target_cate_id", "hist_item_ids", "hist_cate_ids"]
    assert prof.keys() == ["user_id", "user_age"]
    assert seq.values().dtype == torch.int64 and prof.values().dtype == torch.int64
    assert seq.stride() == b and prof.stride() == b
    for t in (batch.user_ids, batch.hist_lengths, batch.target_timestamps, batch.hist_timestamps):
        assert t.dtype == torch.int64
    assert batch.labels.dtype == torch.float32 and batch.labels.shape == (b,)
    assert batch.valid is not None and batch.valid.dtype == torch.float32 and batch.valid.shape == (b,)

    s, p = seq.to_dict(), prof.to_dict()
    lengths = batch.hist_lengths.tolist()
    assert s["target_item_id"].lengths().tolist() == [1] * b
    assert s["hist_item_ids"].lengths().tolist() == lengths
    assert s["hist_cate_ids"].lengths().tolist() == lengths
    assert p["user_age"].lengths().tolist() == [1] * b
    assert batch.hist_timestamps.numel() == sum(lengths)

    def split(values: list[int]) -> list[list[int]]:
        out, pos = [], 0
        for n in lengths:
            out.append(values[pos : pos + n])
            pos += n
        return out

    hist_items = split(s["hist_item_ids"].values().tolist())
    hist_cates = split(s["hist_cate_ids"].values().tolist())
    hist_ts = split(batch.hist_timestamps.tolist())
    rows = []
    for i in range(b):
        rows.append(
            {
                "user_id": p["user_id"].values()[i].item(),
                "user_age": p["user_age"].values()[i].item(),
                "hist_item_ids": hist_items[i],
                "hist_cate_ids": hist_cates[i],
                "hist_timestamps": hist_ts[i],
                "target_item_id": s["target_item_id"].values()[i].item(),
                "target_cate_id": s["target_cate_id"].values()[i].item(),
                "target_timestamp": batch.target_timestamps[i].item(),
                "label": batch.labels[i].item(),
                "valid": batch.valid[i].item(),
            }
        )
        assert batch.user_ids[i].item() == rows[-1]["user_id"]
    return rows


def strip(rows: list[Row]) -> list[Row]:
    return [{k: r[k] for k in FIELDS} for r in rows]


def all_rows(r: BehaviorReader) -> list[list[Row]]:
    """Per batch, the decoded rows; also checks that exactly ``num_batches()`` batches came."""
    batches = [batch_rows(b) for b in r]
    assert len(batches) == r.num_batches() == len(r)
    return batches


# --------------------------------------------------------------------------------------------------------
# Content, order and truncation
# --------------------------------------------------------------------------------------------------------


def test_batches_reproduce_file_contents_in_order(tmp_path: Path) -> None:
    rows = make_rows(37)
    # Row groups of 7 and record batches of 3 rows put batch, chunk and row-group boundaries everywhere.
    path = write(tmp_path / "a.parquet", rows, row_group_size=7)

    r = reader(path, batch_size=5, drop_last=False, read_chunk_rows=3)
    batches = all_rows(r)
    assert [len(b) for b in batches] == [5] * 7 + [2], "single-process reader keeps the short last batch"
    got = [row for b in batches for row in b]
    assert strip(got) == strip(rows), "rows differ from the file, or come in another order"
    assert all(row["valid"] == 1.0 for row in got)

    # drop_last (the default) keeps the 7 full batches, in the same order.
    got = [row for b in all_rows(reader(path, batch_size=5, read_chunk_rows=3)) for row in b]
    assert strip(got) == strip(rows[:35])


@pytest.mark.parametrize("max_history", [0, 1, 3, 8])
def test_most_recent_truncation(tmp_path: Path, max_history: int) -> None:
    rows = make_rows(30, seed=1, max_len=12)
    path = write(tmp_path / "a.parquet", rows, row_group_size=8)
    r = reader(path, max_history=max_history, batch_size=6, read_chunk_rows=5)
    got = [row for b in all_rows(r) for row in b]
    expected = [truncate(row, max_history) for row in rows]
    assert strip(got) == strip(expected), "not the LAST max_history behaviours of each row"
    assert max(len(row["hist_item_ids"]) for row in got) <= max_history


def test_empty_histories(tmp_path: Path) -> None:
    rows = make_rows(12, seed=2)
    for i in (0, 3, 4, 11):
        rows[i].update(hist_item_ids=[], hist_cate_ids=[], hist_timestamps=[])
    path = write(tmp_path / "a.parquet", rows)
    got = [row for b in all_rows(reader(path, batch_size=4)) for row in b]
    assert strip(got) == strip(rows)
    assert [len(got[i]["hist_item_ids"]) for i in (0, 3, 4, 11)] == [0, 0, 0, 0]

    # A batch made only of cold-start users: zero-length histories, empty timestamp tensor.
    cold = make_rows(4, seed=3)
    for row in cold:
        row.update(hist_item_ids=[], hist_cate_ids=[], hist_timestamps=[])
    (batch,) = list(reader(write(tmp_path / "cold.parquet", cold), batch_size=4))
    assert batch.hist_lengths.tolist() == [0, 0, 0, 0]
    assert batch.hist_timestamps.numel() == 0
    assert batch.sequence_features.length_per_key() == [4, 4, 0, 0]
    assert strip(batch_rows(batch)) == strip(cold)


# --------------------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------------------


def _multi_file_set(tmp_path: Path) -> list[Row]:
    """Three files (sorted by name), several row groups each, 53 rows in all; plus files to be ignored."""
    a = make_rows(23, seed=10, start_id=0)
    b = make_rows(11, seed=11, start_id=23)
    c = make_rows(19, seed=12, start_id=34)
    write(tmp_path / "data" / "part-0.parquet", a, row_group_size=5)
    write(tmp_path / "data" / "part-1.parquet", b, row_group_size=11)
    write(tmp_path / "data" / "sub" / "part-2.parquet", c, row_group_size=4)
    # An atomic writer's temporary file and a non-parquet file must not be read.
    write(tmp_path / "data" / ".part-3.parquet.tmp.parquet", make_rows(5, seed=13, start_id=900))
    (tmp_path / "data" / "_SUCCESS").write_text("")
    return a + b + c


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_drop_last_are_disjoint_contiguous_and_in_step(tmp_path: Path, world_size: int) -> None:
    rows = _multi_file_set(tmp_path)
    total, bsz = len(rows), 4
    readers = [
        reader(tmp_path / "data", batch_size=bsz, rank=r, world_size=world_size, read_chunk_rows=3)
        for r in range(world_size)
    ]
    counts = {rd.num_batches() for rd in readers}
    assert len(counts) == 1, f"ranks disagree on the number of batches: {counts}"
    n = counts.pop()
    assert n == min((r + 1) * total // world_size - r * total // world_size for r in range(world_size)) // bsz
    seen: list[int] = []
    for r, rd in enumerate(readers):
        got = [row for b in all_rows(rd) for row in b]
        assert len(got) == n * bsz
        lo = r * total // world_size
        # Without shuffle a rank reads its contiguous share of the global row sequence, in order.
        assert strip(got) == strip(rows[lo : lo + n * bsz]), f"rank {r} does not read its own range"
        seen += [row["target_timestamp"] for row in got]
    assert len(seen) == len(set(seen)), "two ranks read the same row"


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("batch_size", [4, 9, 17])
def test_ranks_pad_last_cover_every_row_once(tmp_path: Path, world_size: int, batch_size: int) -> None:
    rows = _multi_file_set(tmp_path)
    by_id = {row["target_timestamp"]: row for row in rows}
    real: Counter[int] = Counter()
    counts = set()
    for r in range(world_size):
        rd = reader(
            tmp_path / "data",
            batch_size=batch_size,
            rank=r,
            world_size=world_size,
            pad_last=True,
            read_chunk_rows=3,
        )
        counts.add(rd.num_batches())
        for batch in all_rows(rd):
            assert len(batch) == batch_size, "every batch must be padded to batch_size"
            for row in batch:
                assert row["valid"] in (0.0, 1.0)
                # Pads are copies of a real row (valid 0), so they are still well-formed inputs.
                assert strip([row]) == strip([by_id[row["target_timestamp"]]])
                if row["valid"] == 1.0:
                    real[row["target_timestamp"]] += 1
    assert len(counts) == 1, f"ranks disagree on the number of batches: {counts}"
    assert counts.pop() == max(
        math.ceil(((r + 1) * len(rows) // world_size - r * len(rows) // world_size) / batch_size)
        for r in range(world_size)
    )
    assert set(real) == set(by_id), "some row is missing from the union of the ranks"
    assert set(real.values()) == {1}, "some row was seen twice with valid=1"


def test_single_row_group_splits_and_short_rank_gets_whole_pad_batches(tmp_path: Path) -> None:
    rows = make_rows(41, seed=4)
    path = write(tmp_path / "a.parquet", rows)  # one file, one row group
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    # 41 rows over 3 ranks: 13, 14, 14 rows; batch 13 -> 1, 2, 2 batches, so rank 0 needs a padding batch.
    per_rank = [all_rows(reader(path, batch_size=13, rank=r, world_size=3, pad_last=True)) for r in range(3)]
    assert [len(p) for p in per_rank] == [2, 2, 2]
    assert [row["valid"] for row in per_rank[0][1]] == [0.0] * 13
    assert strip(per_rank[0][0]) == strip(rows[:13])
    assert strip(per_rank[1][0] + per_rank[1][1][:1]) == strip(rows[13:27])
    assert [row["valid"] for row in per_rank[1][1]] == [1.0] + [0.0] * 12


def test_rank_without_rows_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "tiny.parquet", make_rows(2))
    with pytest.raises(DataError, match=r"rank 0 of 3 owns no rows.*only 2 rows"):
        reader(path, batch_size=1, rank=0, world_size=3, pad_last=True)


def test_too_few_rows_for_one_batch_with_drop_last_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "tiny.parquet", make_rows(5))
    with pytest.raises(DataError, match=r"no full batch of 8"):
        reader(path, batch_size=8)


# --------------------------------------------------------------------------------------------------------
# Shuffle
# --------------------------------------------------------------------------------------------------------


def _order(r: BehaviorReader) -> list[int]:
    return [row["target_timestamp"] for b in all_rows(r) for row in b]


def test_shuffle_is_a_deterministic_permutation_that_changes_per_epoch(tmp_path: Path) -> None:
    rows = make_rows(120, seed=5)
    path = write(tmp_path / "a.parquet", rows, row_group_size=25)
    ids = [row["target_timestamp"] for row in rows]

    def shuffled(seed: int, epoch: int) -> list[int]:
        r = reader(path, batch_size=10, shuffle_buffer=40, seed=seed, read_chunk_rows=16)
        r.set_epoch(epoch)
        return _order(r)

    e0 = shuffled(seed=7, epoch=0)
    assert sorted(e0) == sorted(ids), "an epoch must be a permutation of the rows"
    assert e0 != ids, "shuffle_buffer > 0 must change the order"
    assert shuffled(seed=7, epoch=0) == e0, "same seed and epoch must give the same order"
    e1 = shuffled(seed=7, epoch=1)
    assert sorted(e1) == sorted(ids) and e1 != e0, "a new epoch must give a new order"
    assert shuffled(seed=8, epoch=0) != e0, "another seed must give another order"

    # The rows travel whole: contents still match the file row for row.
    r = reader(path, batch_size=10, shuffle_buffer=40, seed=7)
    by_id = {row["target_timestamp"]: row for row in rows}
    got = [row for b in all_rows(r) for row in b]
    assert strip(got) == strip([by_id[row["target_timestamp"]] for row in got])


def test_shuffle_within_a_single_row_group(tmp_path: Path) -> None:
    """With one row group there is no row-group order to permute: the buffer itself must be shuffled."""
    rows = make_rows(60, seed=8)
    path = write(tmp_path / "a.parquet", rows)
    ids = [row["target_timestamp"] for row in rows]
    got = _order(reader(path, batch_size=5, shuffle_buffer=20, read_chunk_rows=20, drop_last=False))
    assert sorted(got) == sorted(ids)
    assert got != ids, "rows inside the shuffle buffer were not permuted"
    # Block shuffle: the first buffer (20 rows) is emitted from the first 20 rows read.
    assert set(got[:20]) == set(ids[:20])


def test_shuffle_stays_within_the_rank(tmp_path: Path) -> None:
    rows = make_rows(60, seed=6)
    path = write(tmp_path / "a.parquet", rows, row_group_size=7)
    for rank in range(2):
        r = reader(path, batch_size=6, rank=rank, world_size=2, shuffle_buffer=12, seed=1)
        mine = [row["target_timestamp"] for row in rows[rank * 30 : rank * 30 + 30]]
        got = _order(r)
        assert sorted(got) == sorted(mine), f"rank {rank} shuffled in rows of another rank"
        assert got != mine


# --------------------------------------------------------------------------------------------------------
# Regularization weights
# --------------------------------------------------------------------------------------------------------


def _reg_example(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rows = [
        {
            "user_id": 0,
            "user_age": 2,
            "hist_item_ids": [1, 2],
            "hist_cate_ids": [0, 0],
            "hist_timestamps": [1, 2],
            "target_item_id": 1,
            "target_cate_id": 0,
            "target_timestamp": 3,
            "label": 1.0,
            "extra_ignored": "",
        },
        {
            "user_id": 3,
            "user_age": 2,
            "hist_item_ids": [3],
            "hist_cate_ids": [1],
            "hist_timestamps": [5],
            "target_item_id": 2,
            "target_cate_id": 1,
            "target_timestamp": 6,
            "label": 0.0,
            "extra_ignored": "",
        },
    ]
    freq = {
        "item": np.array([0, 2, 4, 1] + [1] * (ITEMS - 4)),
        "category": np.array([5, 10] + [1] * (CATES - 2)),
        "user": np.array([0, 1, 1, 8] + [1] * (USERS - 4)),  # user 0 never seen: counts as 1
        "age": np.array([1, 1, 4] + [1] * (AGES - 3)),
    }
    return write(tmp_path / "reg.parquet", rows), freq


def test_reg_weights_count_and_indicator_by_hand(tmp_path: Path) -> None:
    path, freq = _reg_example(tmp_path)
    # Items of the batch: targets 1, 2; history 1, 2, 3 -> id 1 twice (n=2), 2 twice (n=4), 3 once (n=1).
    # Categories: targets 0, 1; history 0, 0, 1 -> 0 three times (n=5), 1 twice (n=10).
    expected = {
        "count": {
            "target_item_id": [1 / 2, 1 / 4],
            "hist_item_ids": [1 / 2, 1 / 4, 1 / 1],
            "target_cate_id": [1 / 5, 1 / 10],
            "hist_cate_ids": [1 / 5, 1 / 5, 1 / 10],
            "user_id": [1 / 1, 1 / 8],
            "user_age": [1 / 4, 1 / 4],
        },
        "indicator": {
            "target_item_id": [1 / (2 * 2), 1 / (4 * 2)],
            "hist_item_ids": [1 / (2 * 2), 1 / (4 * 2), 1 / 1],
            "target_cate_id": [1 / (5 * 3), 1 / (10 * 2)],
            "hist_cate_ids": [1 / (5 * 3), 1 / (5 * 3), 1 / (10 * 2)],
            "user_id": [1 / 1, 1 / 8],
            "user_age": [1 / (4 * 2), 1 / (4 * 2)],
        },
    }
    for mode, exp in expected.items():
        (batch,) = list(reader(path, batch_size=2, frequencies=freq, reg_mode=mode))
        assert set(batch.reg_weights) == set(exp), f"{mode}: wrong keys {sorted(batch.reg_weights)}"
        for key, values in exp.items():
            w = batch.reg_weights[key]
            assert w.dtype == torch.float32
            torch.testing.assert_close(w, torch.tensor(values, dtype=torch.float32), msg=f"{mode} {key}")
        # And the same as the documented helper applied to the two KJTs.
        seq_tables = {"target_item_id": "item", "hist_item_ids": "item"}
        seq_tables |= {"target_cate_id": "category", "hist_cate_ids": "category"}
        ref = kjt_mba_coefficients(batch.sequence_features, seq_tables, freq, mode)
        ref |= kjt_mba_coefficients(
            batch.profile_features, {"user_id": "user", "user_age": "age"}, freq, mode
        )
        for key, w in ref.items():
            torch.testing.assert_close(batch.reg_weights[key], w)


def test_no_frequencies_no_reg_weights(tmp_path: Path) -> None:
    path, _ = _reg_example(tmp_path)
    (batch,) = list(reader(path, batch_size=2))
    assert batch.reg_weights == {}


# --------------------------------------------------------------------------------------------------------
# Frequencies file
# --------------------------------------------------------------------------------------------------------


def test_load_frequencies_roundtrip_and_missing_table(tmp_path: Path) -> None:
    _, freq = _reg_example(tmp_path)
    good = tmp_path / "frequencies.npz"
    np.savez(good, **freq)
    loaded = load_frequencies(good, FEATURES)
    assert set(loaded) == {"item", "category", "user", "age"}
    np.testing.assert_array_equal(loaded["item"], freq["item"])

    partial = tmp_path / "partial.npz"
    np.savez(partial, **{k: v for k, v in freq.items() if k != "category"})
    with pytest.raises(DataError, match=r"partial\.npz: table 'category': missing"):
        load_frequencies(partial, FEATURES)

    short = tmp_path / "short.npz"
    np.savez(short, **(freq | {"age": np.ones(AGES - 1, dtype=np.int64)}))
    with pytest.raises(DataError, match=r"short\.npz: table 'age': expected 8 counts"):
        load_frequencies(short, FEATURES)

    with pytest.raises(DataError, match=r"nope\.npz: frequency file does not exist"):
        load_frequencies(tmp_path / "nope.npz", FEATURES)


# --------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------


def _write_bad(tmp_path: Path, rows: list[Row], schema: pa.Schema = SCHEMA, **kw: Any) -> Path:
    return write(tmp_path / "bad.parquet", rows, schema=schema, **kw)


def _iterate(path: Path, **kw: Any) -> None:
    for _ in reader(path, **kw):
        pass


def test_missing_column(tmp_path: Path) -> None:
    rows = make_rows(8)
    schema = SCHEMA.remove(SCHEMA.get_field_index("hist_cate_ids"))
    path = _write_bad(tmp_path, [{k: v for k, v in r.items() if k != "hist_cate_ids"} for r in rows], schema)
    with pytest.raises(
        DataError, match=r"bad\.parquet: column 'hist_cate_ids': missing column.*'hist_item_ids'"
    ):
        reader(path)


def test_list_columns_of_different_lengths(tmp_path: Path) -> None:
    rows = make_rows(12, max_len=5)
    rows[9].update(hist_item_ids=[1, 2, 3], hist_cate_ids=[1, 2], hist_timestamps=[1, 2, 3])
    path = _write_bad(tmp_path, rows, row_group_size=4)
    with pytest.raises(
        DataError,
        match=r"bad\.parquet: row 9: list columns 'hist_item_ids' and 'hist_cate_ids' .*got 3 and 2",
    ):
        _iterate(path, read_chunk_rows=3)


def test_timestamps_of_different_length(tmp_path: Path) -> None:
    rows = make_rows(6, max_len=5)
    rows[2].update(hist_item_ids=[1], hist_cate_ids=[1], hist_timestamps=[])
    path = _write_bad(tmp_path, rows)
    with pytest.raises(DataError, match=r"row 2: list columns 'hist_item_ids' and 'hist_timestamps'"):
        _iterate(path)


def test_negative_id(tmp_path: Path) -> None:
    rows = make_rows(8)
    rows[6]["target_item_id"] = -3
    path = _write_bad(tmp_path, rows, row_group_size=5)
    with pytest.raises(
        DataError, match=r"bad\.parquet: column 'target_item_id', row 6: expected a non-negative id.* got -3"
    ):
        _iterate(path)


def test_id_beyond_table_size(tmp_path: Path) -> None:
    rows = make_rows(12, max_len=4)
    rows[10].update(hist_item_ids=[5, ITEMS], hist_cate_ids=[1, 1], hist_timestamps=[1, 2])
    path = _write_bad(tmp_path, rows, row_group_size=4)
    with pytest.raises(
        DataError,
        match=r"bad\.parquet: column 'hist_item_ids', row 10: expected ids in \[0, 100\) "
        r"\(table 'item', num_embeddings=100\), got 100",
    ):
        # max_history 1 would drop the bad id: the check must cover the file, not only what is kept.
        _iterate(path, read_chunk_rows=3, max_history=1)


def test_profile_id_beyond_table_size(tmp_path: Path) -> None:
    rows = make_rows(8)
    rows[4]["user_age"] = AGES
    path = _write_bad(tmp_path, rows)
    with pytest.raises(
        DataError, match=r"column 'user_age', row 4: .*table 'age', num_embeddings=8\), got 8"
    ):
        _iterate(path)


def test_non_numeric_label(tmp_path: Path) -> None:
    rows = make_rows(8)
    for r in rows:
        r["label"] = "yes"
    schema = SCHEMA.set(SCHEMA.get_field_index("label"), pa.field("label", pa.string()))
    path = _write_bad(tmp_path, rows, schema)
    with pytest.raises(
        DataError, match=r"bad\.parquet: column 'label': expected a numeric 0/1 label.*string"
    ):
        reader(path)


@pytest.mark.parametrize("value", [float("nan"), 2.0, 0.5])
def test_label_not_0_or_1(tmp_path: Path, value: float) -> None:
    rows = make_rows(8)
    rows[5]["label"] = value
    path = _write_bad(tmp_path, rows)
    with pytest.raises(DataError, match=rf"column 'label', row 5: expected a label of 0 or 1, got {value}"):
        _iterate(path)


def test_integer_label_is_accepted(tmp_path: Path) -> None:
    rows = make_rows(8)
    schema = SCHEMA.set(SCHEMA.get_field_index("label"), pa.field("label", pa.int8()))
    for r in rows:
        r["label"] = int(r["label"])
    (b1, b2) = list(reader(_write_bad(tmp_path, rows, schema)))
    assert torch.cat([b1.labels, b2.labels]).tolist() == [float(r["label"]) for r in rows]


def test_null_value(tmp_path: Path) -> None:
    rows = make_rows(8)
    rows[3]["user_age"] = None
    path = _write_bad(tmp_path, rows)
    with pytest.raises(DataError, match=r"column 'user_age', row 3: expected a value, got null"):
        _iterate(path)


def test_null_inside_history(tmp_path: Path) -> None:
    rows = make_rows(8)
    rows[7].update(hist_item_ids=[1, None], hist_cate_ids=[1, 1], hist_timestamps=[1, 2])
    path = _write_bad(tmp_path, rows)
    with pytest.raises(DataError, match=r"column 'hist_item_ids', row 7: .*null element"):
        _iterate(path)


def test_float_id_column_is_a_type_error(tmp_path: Path) -> None:
    rows = make_rows(8)
    schema = SCHEMA.set(SCHEMA.get_field_index("target_item_id"), pa.field("target_item_id", pa.float64()))
    path = _write_bad(tmp_path, rows, schema)
    with pytest.raises(DataError, match=r"column 'target_item_id': expected an integer column, got .*double"):
        reader(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.parquet"
    path.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(DataError, match=r"garbage\.parquet: not a readable parquet file"):
        reader(path)


def test_truncated_file(tmp_path: Path) -> None:
    good = write(tmp_path / "good.parquet", make_rows(50, max_len=20))
    data = good.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.parquet: not a readable parquet file"):
        reader(cut)


def test_corrupt_data_page_with_intact_footer(tmp_path: Path) -> None:
    """The footer reads fine (so construction succeeds) but the first page header is garbage."""
    path = write(tmp_path / "mid.parquet", make_rows(50, max_len=20))
    data = bytearray(path.read_bytes())
    data[4:64] = b"\xff" * 60  # just after the leading 'PAR1' magic: the first column chunk's page header
    path.write_bytes(bytes(data))
    reader(path)  # the footer is intact: no error yet
    with pytest.raises(DataError, match=r"mid\.parquet: row group 0: cannot read parquet data"):
        _iterate(path)


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothing_here: data path does not exist"):
        reader(tmp_path / "nothing_here")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no parquet")
    with pytest.raises(DataError, match=r"empty: expected \*\.parquet files in this folder, found none"):
        reader(tmp_path / "empty")


def test_data_error_is_a_value_error() -> None:
    assert issubclass(DataError, ValueError)


def test_kjt_matches_from_lengths_sync(tmp_path: Path) -> None:
    """The reader builds its KJTs with precomputed stride/length_per_key; they must equal the plain way."""
    rows = make_rows(10, seed=9)
    (batch,) = list(reader(write(tmp_path / "a.parquet", rows), batch_size=10, max_history=4))
    seq = batch.sequence_features
    ref = KeyedJaggedTensor.from_lengths_sync(seq.keys(), seq.values(), seq.lengths())
    assert seq.length_per_key() == ref.length_per_key()
    assert seq.offset_per_key() == ref.offset_per_key()
    for key in seq.keys():
        torch.testing.assert_close(seq[key].values(), ref[key].values())


# ---------------------------------------------------------------------------------------------------------
# In-memory cache
# ---------------------------------------------------------------------------------------------------------


def _assert_same_batches(a: list[Batch], b: list[Batch], where: str) -> None:
    assert len(a) == len(b), f"{where}: {len(a)} vs {len(b)} batches"
    for i, (x, y) in enumerate(zip(a, b)):
        assert_same_batch(x, y, f"{where} batch {i}")


@pytest.mark.parametrize("world_size", [1, 2])
def test_cache_in_memory_gives_the_same_batches_without_reading_again(
    tmp_path: Path, world_size: int
) -> None:
    """Cached rows batch exactly as read ones (shuffled training with regularization weights, padded
    evaluation), epoch after epoch -- and once loaded the files are not needed: a cache that silently read
    them again, or kept rows of another rank, another truncation or a half-read piece, would fail here."""
    data = tmp_path / "data"
    for i in range(3):
        write(
            data / f"part-{i}.parquet", make_rows(45, seed=i, max_len=12, start_id=100 * i), row_group_size=16
        )
    freq = {
        "item": np.arange(1, ITEMS + 1),
        "category": np.arange(CATES) % 4,
        "user": np.ones(USERS, dtype=np.int64),
        "age": np.arange(AGES),
    }
    settings = {
        "train": {"batch_size": 8, "max_history": 6, "shuffle_buffer": 20, "seed": 4, "frequencies": freq},
        "eval": {"batch_size": 16, "max_history": 6, "pad_last": True},
    }
    for rank in range(world_size):
        for split, kw in settings.items():
            where = f"{split} rank {rank}/{world_size}"
            plain = reader(data, rank=rank, world_size=world_size, **kw)
            cached = reader(data, rank=rank, world_size=world_size, cache_in_memory=True, **kw)
            assert plain.load() == 0 and plain.cached_bytes() == 0
            held = cached.load()
            assert held == cached.cached_bytes() > 0, where
            expected = []
            for epoch in range(3):
                plain.set_epoch(epoch)
                expected.append(list(plain))
            (tmp_path / "data").rename(tmp_path / "moved")
            try:
                for epoch in range(3):
                    cached.set_epoch(epoch)
                    _assert_same_batches(list(cached), expected[epoch], f"{where} epoch {epoch}")
                plain.set_epoch(0)
                with pytest.raises(DataError):
                    list(plain)  # the uncached reader does need the files
            finally:
                (tmp_path / "moved").rename(tmp_path / "data")


def test_cache_fills_on_the_first_pass_and_batches_do_not_alias_it(tmp_path: Path) -> None:
    """Without load() the first pass fills the cache; unshuffled batches are copies: a caller writing into one
    (here the labels and ids) must not change what later passes yield."""
    path = write(tmp_path / "d.parquet", make_rows(30, seed=9), row_group_size=7)
    cached = reader(path, batch_size=6, max_history=4, cache_in_memory=True)
    assert cached.cached_bytes() == 0
    first = list(cached)
    assert cached.cached_bytes() > 0
    want = [(b.labels.clone(), b.user_ids.clone(), b.hist_timestamps.clone()) for b in first]
    for b in first:
        b.labels.fill_(7.0)
        b.user_ids.fill_(-1)
        b.hist_timestamps.fill_(-1)
    again = list(cached)
    for i, (b, (labels, users, ts)) in enumerate(zip(again, want)):
        assert torch.equal(b.labels, labels) and torch.equal(b.user_ids, users), f"batch {i} changed"
        assert torch.equal(b.hist_timestamps, ts), f"batch {i} timestamps changed"
    _assert_same_batches(again, list(reader(path, batch_size=6, max_history=4)), "cached vs read")
