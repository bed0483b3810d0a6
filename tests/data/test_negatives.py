"""Tests of DIEN's negative behaviours (``din_torchrec.data.negatives``) and their place in reader batches.

Expectations are computed with plain Python sets and counters, not with the sampler's own numpy tricks.
Distribution tests use fixed seeds and a chi-square bound at p ~ 1e-6, so they are deterministic and only a
real bias (e.g. uniform draws in popularity mode, a skewed fallback) fails them.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings

from din_torchrec.config import FeaturesConfig, SequenceTableConfig
from din_torchrec.data.batch import Batch
from din_torchrec.data.negatives import NegativeSampler, load_item_features, negative_column
from din_torchrec.data.reader import BehaviorReader
from din_torchrec.data.validation import DataError
from din_torchrec.ops import native
from tests.data.test_reader import CATES, FEATURES, ITEMS, make_rows, write


def features(num_items: int, num_categories: int = 5) -> FeaturesConfig:
    return FeaturesConfig(
        sequence=[
            SequenceTableConfig("item", num_items, "target_item_id", "hist_item_ids"),
            SequenceTableConfig("category", num_categories, "target_cate_id", "hist_cate_ids"),
        ],
        profile=[],
    )


NEG_ITEM, NEG_CATE = "neg_hist_item_ids", "neg_hist_cate_ids"


def chi2_bound(df: int, z: float = 4.75) -> float:
    """Upper chi-square quantile at about p = 1e-6 (Wilson-Hilferty; slightly conservative for small df)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2(observed: Counter[int], probs: dict[int, float], n: int) -> float:
    return sum((observed.get(i, 0) - n * p) ** 2 / (n * p) for i, p in probs.items())


def assert_position_free(draws: np.ndarray) -> None:
    """Draws are i.i.d. per position: no trend of the item id along the positions (|corr| < 5 / sqrt(n),
    a ~5 sigma bound); e.g. inverse-CDF draws left in sorted order fail this."""
    n = draws.size
    corr = np.corrcoef(np.arange(n), draws)[0, 1]
    assert abs(corr) < 5 / math.sqrt(n), f"item ids trend with the position (corr {corr:.3f})"


def split(values: list[int], lengths: list[int]) -> list[list[int]]:
    out, pos = [], 0
    for n in lengths:
        out.append(values[pos : pos + n])
        pos += n
    return out


def test_negative_column() -> None:
    assert negative_column("hist_item_ids") == "neg_hist_item_ids"
    assert negative_column("hist_cate_ids") == "neg_hist_cate_ids"


# --------------------------------------------------------------------------------------------------------
# Sampler properties
# --------------------------------------------------------------------------------------------------------


@st.composite
def sampling_cases(draw: st.DrawFn) -> dict[str, Any]:
    """Small catalogues (collisions are frequent, whole histories can cover them), random histories."""
    v = draw(st.integers(2, 25))
    mode = draw(st.sampled_from(["uniform", "popularity"]))
    counts = None
    if mode == "popularity":
        counts = draw(st.lists(st.integers(0, 9), min_size=v, max_size=v))
        if not any(counts[1:]):
            counts[draw(st.integers(1, v - 1))] = 1
    lengths = draw(st.lists(st.integers(0, 12), min_size=0, max_size=6))
    hist = [draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n)) for n in lengths]
    return {
        "v": v,
        "mode": mode,
        "counts": counts,
        "lengths": lengths,
        "hist": hist,
        "cats": draw(st.lists(st.integers(0, 4), min_size=v, max_size=v)),
        "max_rounds": draw(st.sampled_from([0, 1, 8])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


@settings(max_examples=300, deadline=None)
@given(case=sampling_cases())
def test_negatives_are_never_in_the_samples_history(case: dict[str, Any]) -> None:
    v, lengths, hist = case["v"], case["lengths"], case["hist"]
    sampler = NegativeSampler(
        features(v),
        {"category": np.array(case["cats"])},
        case["mode"],
        item_frequencies=None if case["counts"] is None else np.array(case["counts"]),
        max_rounds=case["max_rounds"],
    )
    drawable = {i for i in range(1, v) if case["counts"] is None or case["counts"][i] > 0}
    items = np.array([i for h in hist for i in h], dtype=np.int64)
    rng = np.random.default_rng(case["seed"])
    covered = [r for r, h in enumerate(hist) if h and drawable <= set(h)]
    if covered:
        # No item is left for such a sample: a clear error naming the first one.
        with pytest.raises(DataError, match=rf"sample {covered[0]} of the batch has no negative"):
            sampler.sample(items, np.array(lengths, dtype=np.int64), rng)
        return
    out = sampler.sample(items, np.array(lengths, dtype=np.int64), rng)
    assert list(out) == [NEG_ITEM, NEG_CATE], "one key per sequence table, in table order"
    for k in out:
        assert out[k].dtype == np.int64 and out[k].shape == items.shape, f"{k}: not aligned with the history"
    negs = split(out[NEG_ITEM].tolist(), lengths)
    cates = out[NEG_CATE].tolist()
    for r, (h, n) in enumerate(zip(hist, negs)):
        assert not set(n) & set(h), f"sample {r}: negatives {n} overlap its history {h}"
        assert set(n) <= drawable, f"sample {r}: negatives {n} outside the drawable items {drawable} (id 0?)"
    assert cates == [case["cats"][i] for i in out[NEG_ITEM].tolist()], "category is not that of the negative"


@pytest.mark.parametrize("max_rounds", [0, 2, 8])
@pytest.mark.parametrize("mode", ["uniform", "popularity"])
def test_distribution_given_a_heavy_history_is_exactly_conditional(mode: str, max_rounds: int) -> None:
    """Most of the catalogue is in the history: the rejection rounds and the exact fallback (max_rounds=0
    uses only the fallback) must both give the proposal restricted to the remaining items."""
    counts = np.array([0, 5, 1, 3, 0, 2, 4, 6, 9])  # item 4 has count 0
    history = [1, 3, 8, 3]
    sampler = NegativeSampler(
        features(9), {"category": np.zeros(9, dtype=np.int64)}, mode, counts, max_rounds=max_rounds
    )
    rows = 2000
    items = np.array(history * rows)
    out = sampler.sample(items, np.full(rows, len(history)), np.random.default_rng(5))
    n = items.size
    assert_position_free(out[NEG_ITEM])
    got = Counter(out[NEG_ITEM].tolist())
    allowed = [2, 4, 5, 6, 7] if mode == "uniform" else [2, 5, 6, 7]
    weights = {i: (1.0 if mode == "uniform" else float(counts[i])) for i in allowed}
    probs = {i: w / sum(weights.values()) for i, w in weights.items()}
    assert set(got) == set(allowed), f"drew {sorted(got)}, expected exactly {allowed}"
    stat = chi2(got, probs, n)
    assert stat < chi2_bound(len(allowed) - 1), f"frequencies {dict(got)} not proportional to {probs}"


def test_uniform_mode_is_uniform_and_never_draws_0() -> None:
    v = 201
    sampler = NegativeSampler(features(v), {"category": np.zeros(v, dtype=np.int64)})
    lengths = np.full(2000, 100)
    items = np.zeros(int(lengths.sum()), dtype=np.int64)  # history of padding ids only: nothing excluded
    draws = sampler.sample(items, lengths, np.random.default_rng(1))[NEG_ITEM]
    assert_position_free(draws)
    got = Counter(draws.tolist())
    n = items.size
    assert 0 not in got, "id 0 is reserved and must never be drawn"
    assert set(got) == set(range(1, v))
    stat = chi2(got, {i: 1 / (v - 1) for i in range(1, v)}, n)
    assert stat < chi2_bound(v - 2), f"chi-square {stat:.0f} over {v - 1} items: not uniform"


def test_popularity_mode_follows_counts_and_skips_zero_counts() -> None:
    v = 101
    rng = np.random.default_rng(2)
    counts = (1000 / np.arange(1, v + 1) ** 1.1).astype(np.int64)[rng.permutation(v)]
    counts[rng.choice(np.arange(1, v), 20, replace=False)] = 0
    counts[0] = 10**6  # id 0 must be ignored whatever its count
    sampler = NegativeSampler(features(v), {"category": np.zeros(v, dtype=np.int64)}, "popularity", counts)
    lengths = np.full(2000, 100)
    items = np.zeros(int(lengths.sum()), dtype=np.int64)
    draws = sampler.sample(items, lengths, np.random.default_rng(3))[NEG_ITEM]
    assert_position_free(draws)
    got = Counter(draws.tolist())
    n = items.size
    nonzero = [i for i in range(1, v) if counts[i] > 0]
    assert set(got) <= set(nonzero), f"drew items of count 0 (or id 0): {sorted(set(got) - set(nonzero))}"
    total = sum(int(counts[i]) for i in nonzero)
    probs = {i: counts[i] / total for i in nonzero}
    stat = chi2(got, probs, n)
    assert stat < chi2_bound(len(nonzero) - 1), (
        f"chi-square {stat:.0f}: frequencies not proportional to counts"
    )


def test_sampling_is_deterministic_for_a_seed() -> None:
    v = 50
    cats = np.arange(v) % 5
    lengths = np.array([3, 0, 7, 20])
    items = np.random.default_rng(0).integers(1, v, int(lengths.sum()))

    def draw(sampler_seed: int, seed: int, epoch: int, rank: int) -> np.ndarray:
        s = NegativeSampler(features(v), {"category": cats}, seed=sampler_seed)
        return s.sample(items, lengths, s.generator(seed, epoch, rank))[NEG_ITEM]

    ref = draw(0, 1, 2, 3)
    np.testing.assert_array_equal(draw(0, 1, 2, 3), ref)
    for other in [(1, 1, 2, 3), (0, 2, 2, 3), (0, 1, 3, 3), (0, 1, 2, 4)]:
        assert not np.array_equal(draw(*other), ref), f"{other}: another seed/epoch/rank, same negatives"


def test_empty_batch_and_empty_histories() -> None:
    s = NegativeSampler(features(4), {"category": np.zeros(4, dtype=np.int64)})
    rng = np.random.default_rng(0)
    out = s.sample(np.zeros(0, dtype=np.int64), np.array([0, 0]), rng)
    assert {k: v.shape for k, v in out.items()} == {NEG_ITEM: (0,), NEG_CATE: (0,)}


def test_bad_sampler_arguments() -> None:
    f = features(10)
    cats = {"category": np.zeros(10, dtype=np.int64)}
    with pytest.raises(ValueError, match="mode: expected 'uniform' or 'popularity'"):
        NegativeSampler(f, cats, "zipf")
    with pytest.raises(ValueError, match="popularity' needs item_frequencies"):
        NegativeSampler(f, cats, "popularity")
    with pytest.raises(DataError, match="item_frequencies: expected 10 integer counts"):
        NegativeSampler(f, cats, "popularity", np.ones(9, dtype=np.int64))
    with pytest.raises(DataError, match="no item can be drawn"):
        NegativeSampler(f, cats, "popularity", np.array([5] + [0] * 9))
    with pytest.raises(DataError, match="item_features: key 'category': missing"):
        NegativeSampler(f, {})
    with pytest.raises(DataError, match=r"item_features: key 'category': item 3: expected ids in \[0, 5\)"):
        NegativeSampler(f, {"category": np.array([0, 1, 2, 5, 0, 0, 0, 0, 0, 0])})
    s = NegativeSampler(f, cats)
    with pytest.raises(ValueError, match=r"expected item ids in \[0, 10\)"):
        s.sample(np.array([1, 10]), np.array([2]), np.random.default_rng(0))
    with pytest.raises(ValueError, match="lengths summing to N"):
        s.sample(np.array([1, 2]), np.array([1]), np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------------
# item_features.npz
# --------------------------------------------------------------------------------------------------------


def test_load_item_features_roundtrip(tmp_path: Path) -> None:
    f = features(6, num_categories=4)
    cats = np.array([0, 1, 3, 3, 2, 1], dtype=np.int32)
    np.savez(tmp_path / "item_features.npz", category=cats, extra=np.arange(3))
    got = load_item_features(tmp_path / "item_features.npz", f)
    assert list(got) == ["category"], "one array per non-item sequence table, extra arrays ignored"
    assert got["category"].dtype == np.int64
    np.testing.assert_array_equal(got["category"], cats)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"other": np.zeros(6, dtype=np.int64)}, r"key 'category': missing item feature array.*'other'"),
        ({"category": np.zeros(5, dtype=np.int64)}, r"key 'category': expected one id per item, 6 .*got 5"),
        (
            {"category": np.array([0, 1, 2, 4, 0, 0])},
            r"key 'category': item 3: expected ids in \[0, 4\) \(table 'category', num_embeddings=4\), got 4",
        ),
        ({"category": np.array([0, 1, -1, 0, 0, 0])}, r"key 'category': item 2: .*got -1"),
        ({"category": np.zeros(6, dtype=np.float32)}, r"key 'category': expected a 1-d integer array"),
    ],
    ids=["missing-key", "wrong-length", "out-of-range", "negative", "float"],
)
def test_bad_item_features_file(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    path = tmp_path / "item_features.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"item_features\.npz: " + message):
        load_item_features(path, features(6, num_categories=4))


def test_missing_or_unreadable_item_features_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.npz: item feature file does not exist"):
        load_item_features(tmp_path / "nope.npz", features(6))
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    with pytest.raises(DataError, match=r"junk\.npz: cannot read item feature file"):
        load_item_features(tmp_path / "junk.npz", features(6))


# --------------------------------------------------------------------------------------------------------
# Reader integration
# --------------------------------------------------------------------------------------------------------

BASE_KEYS = ["target_item_id", "target_cate_id", "hist_item_ids", "hist_cate_ids"]
CATE_OF_ITEM = np.random.default_rng(11).integers(0, CATES, ITEMS)


def neg_reader(path: Path, negatives: bool = True, sampler_seed: int = 0, **kw: Any) -> BehaviorReader:
    kw.setdefault("max_history", 100)
    kw.setdefault("batch_size", 4)
    sampler = NegativeSampler(FEATURES, {"category": CATE_OF_ITEM}, seed=sampler_seed) if negatives else None
    return BehaviorReader(path, FEATURES, negatives=sampler, **kw)


def check_negatives(batch: Batch) -> list[list[int]]:
    """Check one batch's negative keys with plain Python; return its negative items per sample."""
    seq = batch.sequence_features
    assert seq.keys() == [*BASE_KEYS, NEG_ITEM, NEG_CATE], "negative keys missing or not after the others"
    d = seq.to_dict()
    lengths = batch.hist_lengths.tolist()
    for k in (NEG_ITEM, NEG_CATE):
        assert d[k].lengths().tolist() == lengths, f"{k}: lengths differ from the history's"
        assert d[k].values().dtype == torch.int64
    hist = split(d["hist_item_ids"].values().tolist(), lengths)
    negs = split(d[NEG_ITEM].values().tolist(), lengths)
    for r, (h, n) in enumerate(zip(hist, negs)):
        assert 0 not in n and not set(n) & set(h), f"sample {r}: negatives {n} vs history {h}"
    cates = d[NEG_CATE].values().tolist()
    assert cates == [int(CATE_OF_ITEM[i]) for i in d[NEG_ITEM].values().tolist()]
    assert set(batch.reg_weights) <= set(BASE_KEYS) | {"user_id", "user_age"}, "reg_weights for negatives"
    return negs


def test_reader_batches_carry_negatives(tmp_path: Path) -> None:
    path = write(tmp_path / "a.parquet", make_rows(40, seed=3, max_len=30), row_group_size=9)
    freq = {"item": np.ones(ITEMS), "category": np.ones(CATES), "user": np.ones(50), "age": np.ones(8)}
    r = neg_reader(path, batch_size=6, max_history=5, shuffle_buffer=12, frequencies=freq, pad_last=True)
    batches = list(r)
    assert len(batches) == r.num_batches()
    for b in batches:
        check_negatives(b)
        assert set(b.reg_weights) == set(BASE_KEYS) | {"user_id", "user_age"}
    # KJT bookkeeping stays consistent with the plain construction.
    seq = batches[0].sequence_features
    n_hist = int(batches[0].hist_lengths.sum())
    assert seq.length_per_key() == [6, 6, n_hist, n_hist, n_hist, n_hist]
    assert seq.values().numel() == sum(seq.length_per_key())


def test_negatives_leave_the_rest_of_the_batch_unchanged(tmp_path: Path) -> None:
    path = write(tmp_path / "a.parquet", make_rows(30, seed=4), row_group_size=7)
    kw: dict[str, Any] = {"batch_size": 5, "shuffle_buffer": 10, "seed": 3, "max_history": 4}
    for with_neg, without in zip(neg_reader(path, **kw), neg_reader(path, negatives=False, **kw)):
        assert without.sequence_features.keys() == BASE_KEYS
        a, b = with_neg.sequence_features.to_dict(), without.sequence_features.to_dict()
        for k in BASE_KEYS:
            torch.testing.assert_close(a[k].values(), b[k].values(), msg=f"{k} changed (shuffle disturbed?)")
        for name in ("labels", "user_ids", "hist_timestamps", "hist_lengths", "target_timestamps"):
            torch.testing.assert_close(getattr(with_neg, name), getattr(without, name), msg=name)


def test_reader_negatives_reproducible_per_epoch_and_different_across_epochs(tmp_path: Path) -> None:
    path = write(tmp_path / "a.parquet", make_rows(48, seed=5, max_len=20), row_group_size=10)

    def epoch_negatives(epoch: int, sampler_seed: int = 0, rank: int = 0, world_size: int = 1) -> list[Any]:
        r = neg_reader(path, sampler_seed=sampler_seed, batch_size=8, rank=rank, world_size=world_size)
        r.set_epoch(epoch)
        return [check_negatives(b) for b in r]

    e0 = epoch_negatives(0)
    assert epoch_negatives(0) == e0, "same seed and epoch must give the same negatives"
    # No shuffle: the rows are identical across epochs, so only the negatives' stream can differ.
    assert epoch_negatives(1) != e0, "a new epoch must draw new negatives"
    assert epoch_negatives(0, sampler_seed=1) != e0, "the sampler's seed must change the negatives"
    r0, r1 = epoch_negatives(0, rank=0, world_size=2), epoch_negatives(0, rank=1, world_size=2)
    assert epoch_negatives(0, rank=1, world_size=2) == r1 and r0 != r1


def test_negatives_come_from_the_truncated_history(tmp_path: Path) -> None:
    """Items dropped by max_history are not the batch's history: a history covering the whole catalogue
    must still get negatives once truncated (and the kept items are never drawn)."""
    small = FeaturesConfig(
        sequence=[
            SequenceTableConfig("item", 6, "target_item_id", "hist_item_ids"),
            SequenceTableConfig("category", CATES, "target_cate_id", "hist_cate_ids"),
        ],
        profile=FEATURES.profile,
    )
    rows = make_rows(4, seed=6)
    for row in rows:
        row.update(
            hist_item_ids=[1, 2, 3, 4, 5],
            hist_cate_ids=[0] * 5,
            hist_timestamps=[1, 2, 3, 4, 5],
            target_item_id=1,
        )
    path = write(tmp_path / "a.parquet", rows)
    cats = np.array([0, 1, 2, 3, 4, 5])
    sampler = NegativeSampler(small, {"category": cats})
    (batch,) = list(BehaviorReader(path, small, max_history=2, batch_size=4, negatives=sampler))
    negs = batch.sequence_features[NEG_ITEM].values().tolist()
    assert len(negs) == 8 and set(negs) <= {1, 2, 3}, f"negatives {negs} must avoid the kept items 4, 5"
    with pytest.raises(DataError, match="has no negative"):
        list(BehaviorReader(path, small, max_history=5, batch_size=4, negatives=sampler))


def test_reader_rejects_a_sampler_of_other_tables(tmp_path: Path) -> None:
    path = write(tmp_path / "a.parquet", make_rows(8))
    other = NegativeSampler(features(ITEMS, CATES + 1), {"category": np.zeros(ITEMS, dtype=np.int64)})
    with pytest.raises(ValueError, match="sampler's sequence tables"):
        BehaviorReader(path, FEATURES, max_history=5, batch_size=4, negatives=other)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 120), min_size=1, max_size=30),
    num_items=st.sampled_from([3, 40, 5000]),
    seed=st.integers(0, 2**16),
)
def test_native_history_check_equals_numpy(lengths: list[int], num_items: int, seed: int) -> None:
    # The C++ membership check (short histories scanned, long ones sorted and searched) against NumPy's sort +
    # searchsorted; and the sampler gives the same negatives with either.
    mod = native.kernels()
    if mod is None:
        pytest.skip("native kernels unavailable")
    rng = np.random.default_rng(seed)
    lens = np.asarray(lengths, dtype=np.int64)
    items = rng.integers(1, num_items, size=int(lens.sum()))
    rows = np.repeat(np.arange(lens.size), lens)
    cand = rng.integers(1, num_items, size=rows.size)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    got = mod.in_own_history(
        *(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)) for a in (offsets, items, rows, cand))
    )
    want = np.array([c in set(items[offsets[r] : offsets[r + 1]]) for r, c in zip(rows, cand)], dtype=bool)
    np.testing.assert_array_equal(got.numpy(), want)
    # The sampler with either check: the same negatives, or the same error where a history holds every
    # drawable item.
    sampler = NegativeSampler(features(num_items), {"category": np.arange(num_items) % 5}, mode="uniform")

    def draw(use_native: bool) -> dict[str, np.ndarray] | str:
        sampler.use_native = use_native
        try:
            return sampler.sample(items, lens, sampler.generator(seed))
        except DataError as e:
            return str(e)

    a, b = draw(True), draw(False)
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
    else:
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
