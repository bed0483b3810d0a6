"""``prepare amazon``: format parsing, the DIN/DIEN protocols, side files, bad input, determinism."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from din_torchrec.config import load_config
from din_torchrec.data.prepare import PrepareError, prepare_amazon
from tests.data.prepare.helpers import (
    check_protocol,
    file_bytes,
    item_categories,
    load_split,
    meta_entries,
    random_reviews,
    vocab,
    write_amazon,
    write_lines,
)


def _behaviours(reviews):
    return [(r["reviewerID"], r["asin"], r["unixReviewTime"]) for r in reviews]


@pytest.mark.parametrize(
    "gz,literal,layout",
    [(False, True, "referenced"), (True, False, "flat"), (True, True, "referenced")],
    ids=["plain-literal-referenced", "gzip-json-flat", "gzip-literal-referenced"],
)
def test_conversion_follows_din_protocol(tmp_path: Path, gz: bool, literal: bool, layout: str) -> None:
    reviews, asins = random_reviews(seed=1)
    r, m = write_amazon(tmp_path, reviews, meta_entries(asins), gz=gz, literal_meta=literal)
    out = tmp_path / "out"
    meta = prepare_amazon(r, m, out, layout=layout, seed=3)

    check_protocol(out, _behaviours(reviews), "din")
    # The category is the last element of the first path; ids are contiguous from 1 in sorted raw order.
    items, cats = vocab(out, "item"), vocab(out, "category")
    assert list(items) == list(range(1, len(items) + 1)) and list(items.values()) == sorted(items.values())
    assert set(items.values()) == {x["asin"] for x in reviews}
    by_asin = {e["asin"]: e["categories"][0][-1] for e in meta_entries(asins)}
    cate = item_categories(out)
    assert cate[0] == 0 and all(cats[int(cate[i])] == by_asin[a] for i, a in items.items())
    assert sorted(vocab(out, "user").values()) == sorted({x["reviewerID"] for x in reviews})
    # meta.json: sizes, rows, the ignored meta entries of unreviewed products, layout.
    assert meta["layout"] == layout and json.loads((out / "meta.json").read_text()) == meta
    assert meta["tables"] == {
        "item": len(items) + 1,
        "category": len(cats) + 1,
        "user": len(vocab(out, "user")) + 1,
    }
    assert meta["ignored"]["meta_without_reviews"] == len(asins) + 5 - len(items)
    assert meta["skipped"] == {}
    assert meta["rows"] == {"train": len(load_split(out, "train")), "test": len(load_split(out, "test"))}
    assert (out / "histories").exists() == (layout == "referenced")


def test_frequencies_and_experiment_config(tmp_path: Path) -> None:
    reviews, asins = random_reviews(seed=2)
    r, m = write_amazon(tmp_path, reviews, meta_entries(asins))
    out = tmp_path / "out"
    meta = prepare_amazon(r, m, out, max_history=3)
    rows = load_split(out, "train")
    item, cate, user = Counter(), Counter(), Counter()
    for x in rows:
        item.update(x["hist_item_ids"] + [x["target_item_id"]])
        cate.update(x["hist_cate_ids"] + [x["target_cate_id"]])
        user[x["user_id"]] += 1
    assert max(len(x["hist_item_ids"]) for x in rows) <= 3
    with np.load(out / "frequencies.npz") as z:
        for name, counter in (("item", item), ("category", cate), ("user", user)):
            expected = np.zeros(meta["tables"][name], dtype=np.int64)
            for k, v in counter.items():
                expected[k] = v
            np.testing.assert_array_equal(z[name], expected, err_msg=f"frequencies[{name!r}]")
    cfg = load_config(out / "experiment.yaml")
    assert cfg.data.dir == str(out) and cfg.data.max_history == 3
    assert [(t.name, t.num_embeddings) for t in cfg.features.sequence] == [
        ("item", meta["tables"]["item"]),
        ("category", meta["tables"]["category"]),
    ]
    assert [(p.name, p.num_embeddings, p.column) for p in cfg.features.profile] == [
        ("user", meta["tables"]["user"], "user_id")
    ]


@pytest.mark.parametrize("layout", ["referenced", "flat"])
def test_dien_protocol_and_history_cap(tmp_path: Path, layout: str) -> None:
    reviews, asins = random_reviews(seed=4)
    r, m = write_amazon(tmp_path, reviews, meta_entries(asins))
    out = tmp_path / "out"
    meta = prepare_amazon(r, m, out, protocol="dien", layout=layout, max_history=2)
    check_protocol(out, _behaviours(reviews), "dien")
    distinct = Counter()
    for u, items in {
        u: {x["asin"] for x in reviews if x["reviewerID"] == u} for u in {x["reviewerID"] for x in reviews}
    }.items():
        distinct[u] = len(items)
    assert meta["rows"]["train"] == 2 * sum(1 for n in distinct.values() if n >= 3)
    assert meta["rows"]["test"] == 2 * sum(1 for n in distinct.values() if n >= 2)


def test_byte_identical_and_seeded(tmp_path: Path) -> None:
    reviews, asins = random_reviews(seed=5)
    r, m = write_amazon(tmp_path, reviews, meta_entries(asins), gz=True)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    prepare_amazon(r, m, a, seed=7, rows_per_file=20, row_group_size=8)
    first = file_bytes(a)
    prepare_amazon(r, m, a, seed=7, rows_per_file=20, row_group_size=8)  # rerun into the same folder
    assert file_bytes(a) == first, "rerunning with the same seed must give byte-identical files"
    prepare_amazon(r, m, b, seed=7, rows_per_file=20, row_group_size=8)
    other = file_bytes(b)
    assert {k: v for k, v in other.items() if k != "experiment.yaml"} == {
        k: v for k, v in first.items() if k != "experiment.yaml"
    }
    assert len([k for k in first if k.startswith("train/")]) > 1
    prepare_amazon(r, m, c, seed=8, rows_per_file=20, row_group_size=8)
    assert file_bytes(c)["test/part-00000.parquet"] != first["test/part-00000.parquet"], "seed unused"


def test_2018_category_field_and_last_path(tmp_path: Path) -> None:
    reviews, asins = random_reviews(n_users=6, n_items=30, seed=6)
    meta = [{"asin": a, "category": ["Books", "Kids", f"K{i % 2}"]} for i, a in enumerate(asins)]
    r, m = write_amazon(tmp_path, reviews, meta, literal_meta=False)
    out = tmp_path / "out"
    prepare_amazon(r, m, out)
    assert set(vocab(out, "category").values()) <= {"K0", "K1"}
    # The DIN repository's rule: the last element of the last path.
    r, m = write_amazon(tmp_path, reviews, meta_entries(asins))
    prepare_amazon(r, m, out, category_path="last")
    assert set(vocab(out, "category").values()) == {"Ignored"}


# --------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------


def _bad_case(tmp_path: Path, case: str):
    """Files with one defect; returns (reviews, meta, kwargs, file name, line, reason, count)."""
    reviews, asins = random_reviews(n_users=8, n_items=12, seed=7)
    meta = meta_entries(asins)
    rlines = [json.dumps(x) for x in reviews]
    mlines = [repr(x) for x in meta]
    kw: dict = {}
    if case == "malformed_review":
        rlines.insert(3, '{"reviewerID": "A1", "asin": ')  # line 4
        where, line, reason, count = "reviews_X_5.json", 4, "malformed_line", 1
    elif case == "missing_field":
        rlines.insert(5, json.dumps({"reviewerID": "A1", "asin": asins[0]}))  # line 6, no unixReviewTime
        where, line, reason, count = "reviews_X_5.json", 6, "missing_field", 1
    elif case == "bad_time":
        rlines.insert(0, json.dumps({"reviewerID": "A1", "asin": asins[0], "unixReviewTime": "soon"}))
        where, line, reason, count = "reviews_X_5.json", 1, "bad_value", 1
    elif case == "malformed_meta":
        target = reviews[0]["asin"]
        i = next(j for j, e in enumerate(meta) if e["asin"] == target)
        mlines[i] = f"{{'asin': '{target}', 'categories': [["  # truncated literal of a reviewed item
        where, line, reason, count = "meta_X.json", i + 1, "malformed_line", 1
    elif case == "garbage_meta":
        mlines.insert(2, "%%% not an object")  # line 3, no asin to look at
        where, line, reason, count = "meta_X.json", 3, "malformed_line", 1
    elif case == "meta_missing_categories":
        target = reviews[0]["asin"]
        i = next(j for j, e in enumerate(meta) if e["asin"] == target)
        mlines[i] = repr({"asin": target, "title": "no categories"})
        where, line, reason, count = "meta_X.json", i + 1, "missing_field", 1
    elif case == "unknown_meta_item":
        mlines.insert(0, repr({"asin": "NOT-REVIEWED", "categories": [["A"]]}))  # line 1
        kw = {"unknown_meta": "error"}
        where, line, reason = "meta_X.json", 1, "unknown_item"
        count = 1 + 5 + len(asins) - len({x["asin"] for x in reviews})  # plus the unreviewed products
    elif case == "item_without_meta":
        target = reviews[0]["asin"]
        mlines = [x for x, e in zip(mlines, meta) if e["asin"] != target]
        where, line, reason = "reviews_X_5.json", 1, "item_without_meta"
        count = sum(1 for x in reviews if x["asin"] == target)
    else:  # pragma: no cover
        raise AssertionError(case)
    r = write_lines(tmp_path / "reviews_X_5.json", rlines)
    m = write_lines(tmp_path / "meta_X.json", mlines)
    return r, m, kw, where, line, reason, count


CASES = [
    "malformed_review",
    "missing_field",
    "bad_time",
    "malformed_meta",
    "garbage_meta",
    "meta_missing_categories",
    "unknown_meta_item",
    "item_without_meta",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_line_raises_with_file_and_line(tmp_path: Path, case: str) -> None:
    r, m, kw, where, line, _, _ = _bad_case(tmp_path, case)
    with pytest.raises(PrepareError, match=rf"{where}:{line}: "):
        prepare_amazon(r, m, tmp_path / "out", **kw)
    assert not (tmp_path / "out" / "meta.json").exists(), "a failed run must not look complete"


@pytest.mark.parametrize("case", CASES)
def test_bad_line_skipped_and_counted(tmp_path: Path, case: str) -> None:
    r, m, kw, where, line, reason, count = _bad_case(tmp_path, case)
    meta = prepare_amazon(r, m, tmp_path / "out", on_error="skip", **kw)
    entry = meta["skipped"][where][reason]
    assert entry["count"] == count, f"{reason}: counted {entry['count']}, expected {count}"
    assert entry["first"].startswith(f"{tmp_path / where}:{line}: ")
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["skipped"] == meta["skipped"]


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    reviews, asins = random_reviews(n_users=3, n_items=4)
    r, _ = write_amazon(tmp_path, reviews, meta_entries(asins))
    with pytest.raises(PrepareError, match=r"meta_nope\.json: file does not exist"):
        prepare_amazon(r, tmp_path / "meta_nope.json", tmp_path / "out", on_error="skip")


def test_truncated_gzip_names_file_and_line(tmp_path: Path) -> None:
    reviews, asins = random_reviews(seed=8)
    r, m = write_amazon(tmp_path, reviews, meta_entries(asins), gz=True)
    data = r.read_bytes()
    r.write_bytes(data[: len(data) // 2])
    with pytest.raises(PrepareError, match=r"reviews_X_5\.json\.gz:\d+: corrupt or truncated gzip"):
        prepare_amazon(r, m, tmp_path / "out")


@pytest.mark.parametrize("rounds", [64, 0], ids=["rejection", "exact-fallback"])
def test_negative_of_a_user_owning_almost_every_item(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rounds: int
) -> None:
    import din_torchrec.data.prepare.core as core

    monkeypatch.setattr(core, "_MAX_REJECTION_ROUNDS", rounds)
    asins = [f"I{i}" for i in range(12)]
    reviews = [
        {"reviewerID": "greedy", "asin": a, "unixReviewTime": 100 + i} for i, a in enumerate(asins[:11])
    ]
    reviews += [{"reviewerID": "other", "asin": a, "unixReviewTime": 5} for a in asins[5:]]
    r, m = write_amazon(tmp_path, reviews, meta_entries(asins, extra=0))
    out = tmp_path / "out"
    prepare_amazon(r, m, out, layout="flat")
    check_protocol(out, _behaviours(reviews))
    items, users = vocab(out, "item"), vocab(out, "user")
    negatives = [
        items[x["target_item_id"]]
        for split in ("train", "test")
        for x in load_split(out, split)
        if x["label"] == 0.0 and users[x["user_id"]] == "greedy"
    ]
    assert negatives and set(negatives) == {"I11"}, "the only item the user never reviewed"
