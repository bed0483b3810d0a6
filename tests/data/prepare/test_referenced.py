"""The referenced layout: its reader yields exactly the flat reader's batches on the same prepared data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from din_torchrec.config import load_config
from din_torchrec.data.negatives import NegativeSampler, load_item_features
from din_torchrec.data.prepare import prepare_amazon, prepare_movielens
from din_torchrec.data.reader import BehaviorReader, DataError, load_frequencies
from din_torchrec.data.referenced import ReferencedBehaviorReader, dataset_layout, open_reader
from tests.data.batch_checks import assert_same_batch
from tests.data.prepare.helpers import meta_entries, random_reviews, write_amazon, write_ml1m


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same Amazon-format data prepared in both layouts, several part files and row groups each."""
    d = tmp_path_factory.mktemp("twins")
    reviews, asins = random_reviews(n_users=60, n_items=80, seed=11, max_per_user=14)
    r, m = write_amazon(d, reviews, meta_entries(asins), gz=True)
    kw = {"seed": 5, "rows_per_file": 150, "row_group_size": 32}
    prepare_amazon(r, m, d / "flat", layout="flat", **kw)
    prepare_amazon(r, m, d / "ref", layout="referenced", **kw)
    return d / "flat", d / "ref"


def _compare(flat: Path, ref: Path, split: str, cache_ref: bool = False, **kw) -> int:
    """Batches of two epochs equal; ``cache_ref``: the referenced reader holds its rows in memory."""
    cfg = load_config(ref / "experiment.yaml")
    a = BehaviorReader(flat / split, cfg.features, **kw)
    b = ReferencedBehaviorReader(ref / split, cfg.features, cache_in_memory=cache_ref, **kw)
    assert (b.load() > 0) == cache_ref
    assert len(a) == len(b) and a.num_rows == b.num_rows
    n = 0
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        batches_a, batches_b = list(a), list(b)
        assert len(batches_a) == len(batches_b) == len(a)
        for i, (x, y) in enumerate(zip(batches_a, batches_b)):
            assert_same_batch(x, y, f"{split} {kw} epoch {epoch} batch {i}")
            n += 1
    return n


@pytest.mark.parametrize(
    "kw",
    [
        {"batch_size": 1, "max_history": 100, "drop_last": False},
        {"batch_size": 7, "max_history": 3, "drop_last": False, "read_chunk_rows": 5},
        {"batch_size": 64, "max_history": 0, "shuffle_buffer": 0},
        {"batch_size": 16, "max_history": 5, "shuffle_buffer": 50, "seed": 3},
        {"batch_size": 16, "max_history": 8, "shuffle_buffer": 40, "rank": 0, "world_size": 2},
        {"batch_size": 16, "max_history": 8, "shuffle_buffer": 40, "rank": 1, "world_size": 2},
        {"batch_size": 32, "max_history": 4, "pad_last": True, "rank": 1, "world_size": 2},
    ],
    ids=["b1", "b7-chunk5", "b64-nohistory", "b16-shuffle", "2ranks-r0", "2ranks-r1", "pad-r1"],
)
def test_referenced_batches_equal_flat(twins: tuple[Path, Path], kw: dict) -> None:
    flat, ref = twins
    assert _compare(flat, ref, "train", **kw) > 0


@pytest.mark.parametrize("cache_ref", [False, True], ids=["read", "cached"])
def test_equal_with_frequencies_and_negatives(twins: tuple[Path, Path], cache_ref: bool) -> None:
    flat, ref = twins
    cfg = load_config(ref / "experiment.yaml")
    freq = load_frequencies(ref / "frequencies.npz", cfg.features)
    np.testing.assert_array_equal(
        freq["item"], load_frequencies(flat / "frequencies.npz", cfg.features)["item"]
    )
    items = load_item_features(ref / "item_features.npz", cfg.features)
    for split, extra in (
        ("train", {"frequencies": freq, "reg_mode": "indicator"}),
        ("test", {"pad_last": True}),
    ):
        _compare(
            flat,
            ref,
            split,
            cache_ref,
            batch_size=24,
            max_history=6,
            shuffle_buffer=30 if split == "train" else 0,
            negatives=NegativeSampler(cfg.features, items, "uniform", seed=2),
            **extra,
        )


def test_profile_columns_equal(tmp_path: Path) -> None:
    ratings = [
        (u, m, 1 + (u * m) % 5, 978_300_000 + 37 * u + m)
        for u in range(1, 15)
        for m in range(1 + u % 2, 30, 2 + u % 3)
    ]
    genres = {m: ["Drama|Comedy", "Action", "Comedy"][m % 3] for m in range(1, 31)}
    users = {u: ("F" if u % 2 else "M", [1, 18, 25, 56][u % 4], u % 21) for u in range(1, 15)}
    d = write_ml1m(tmp_path / "ml-1m", ratings, genres, users)
    for layout in ("flat", "referenced"):
        prepare_movielens(d, tmp_path / layout, layout=layout, row_group_size=16)
    _compare(
        tmp_path / "flat", tmp_path / "referenced", "train", batch_size=10, max_history=4, shuffle_buffer=25
    )


def test_open_reader_picks_the_layout(twins: tuple[Path, Path], tmp_path: Path) -> None:
    flat, ref = twins
    cfg = load_config(ref / "experiment.yaml")
    kw = {"batch_size": 8, "max_history": 5}
    assert dataset_layout(ref / "train") == "referenced" and dataset_layout(flat / "test") == "flat"
    assert type(open_reader(ref / "train", cfg.features, **kw)) is ReferencedBehaviorReader
    assert (
        type(open_reader(ref / "train" / "part-00000.parquet", cfg.features, **kw))
        is ReferencedBehaviorReader
    )
    assert type(open_reader(flat / "train", cfg.features, **kw)) is BehaviorReader
    with pytest.raises(DataError, match="a dataset folder .* pass one of its split folders"):
        open_reader(ref, cfg.features, **kw)
    # Without any meta.json (e.g. a generated-elsewhere folder of flat files): flat.
    bare = tmp_path / "bare" / "x"
    shutil.copytree(flat / "train", bare)
    assert dataset_layout(bare) == "flat" and type(open_reader(bare, cfg.features, **kw)) is BehaviorReader


def test_referenced_is_smaller(twins: tuple[Path, Path]) -> None:
    flat, ref = twins

    def size(root: Path) -> int:
        return sum(
            p.stat().st_size for d in ("train", "test", "histories") for p in (root / d).rglob("*.parquet")
        )

    # Few, short histories here; the gap grows with the history length (see measure_layouts).
    assert size(ref) < size(flat)


# --------------------------------------------------------------------------------------------------------
# Bad references
# --------------------------------------------------------------------------------------------------------


def _tamper(ref: Path, dst: Path, column: str, row: int, value: int) -> Path:
    shutil.copytree(ref, dst)
    part = dst / "train" / "part-00000.parquet"
    t = pq.read_table(part)
    col = t.column(column).to_pylist()
    col[row] = value
    t = t.set_column(t.schema.get_field_index(column), column, pa.array(col, t.schema.field(column).type))
    pq.write_table(t, part, row_group_size=32)
    return dst


@pytest.mark.parametrize(
    "column,value,message",
    [
        ("hist_end", 10_000, r"column 'hist_end', row 3: expected 0 <= hist_begin <= hist_end <= \d+"),
        ("hist_begin", -1, r"column 'hist_end', row 3: expected 0 <= hist_begin"),
    ],
)
def test_bad_reference_names_file_and_row(
    twins, tmp_path: Path, column: str, value: int, message: str
) -> None:
    _, ref = twins
    bad = _tamper(ref, tmp_path / "bad", column, 3, value)
    cfg = load_config(ref / "experiment.yaml")
    reader = ReferencedBehaviorReader(bad / "train", cfg.features, batch_size=8, max_history=5)
    with pytest.raises(DataError, match=r"part-00000\.parquet: " + message):
        list(reader)


def test_user_without_history_and_missing_histories(twins, tmp_path: Path) -> None:
    _, ref = twins
    cfg = load_config(ref / "experiment.yaml")
    bad = tmp_path / "bad"
    shutil.copytree(ref, bad)
    hist = pq.read_table(bad / "histories")
    first_user = pq.read_table(bad / "train" / "part-00000.parquet").column("user_id")[0].as_py()
    keep = pa.array([u != first_user for u in hist.column("user_id").to_pylist()])
    pq.write_table(hist.filter(keep), bad / "histories" / "part-00000.parquet")
    reader = ReferencedBehaviorReader(bad / "train", cfg.features, batch_size=8, max_history=5)
    with pytest.raises(DataError, match=rf"column 'user_id', row 0: user {first_user} has no sequence"):
        list(reader)
    pq.write_table(pa.concat_tables([hist, hist.slice(2, 1)]), bad / "histories" / "part-00000.parquet")
    with pytest.raises(
        DataError, match=rf"column 'user_id', row {hist.num_rows}: user \d+ has more than one"
    ):
        ReferencedBehaviorReader(bad / "train", cfg.features, batch_size=8, max_history=5)
    shutil.rmtree(bad / "histories")
    meta = json.loads((bad / "meta.json").read_text())
    assert meta["histories"] == "histories"
    with pytest.raises(DataError, match="data path does not exist"):
        ReferencedBehaviorReader(bad / "train", cfg.features, batch_size=8, max_history=5)
