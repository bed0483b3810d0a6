"""``prepare taobao``: streamed CSV blocks, clicks as behaviours, timestamps kept, bad lines by number."""

from __future__ import annotations

from pathlib import Path

import pytest

from din_torchrec.data.prepare import PrepareError, prepare_taobao
from tests.data.prepare.helpers import (
    check_protocol,
    file_bytes,
    item_categories,
    load_split,
    random_taobao,
    vocab,
    write_lines,
    write_taobao,
)


@pytest.mark.parametrize("gz,layout", [(False, "referenced"), (True, "flat")])
def test_clicks_become_behaviours(tmp_path: Path, gz: bool, layout: str) -> None:
    rows = random_taobao(seed=1)
    csv = write_taobao(tmp_path / ("UserBehavior.csv" + (".gz" if gz else "")), rows, gz)
    out = tmp_path / "out"
    meta = prepare_taobao(csv, out, layout=layout, block_size=512)  # many blocks
    clicks = [(u, i, t) for u, i, _, b, t in rows if b == "pv"]
    check_protocol(out, clicks)
    assert meta["ignored"]["other_behavior_types"] == len(rows) - len(clicks)
    assert meta["counts"]["lines"] == len(rows)
    items, cats, cate = vocab(out, "item"), vocab(out, "category"), item_categories(out)
    cat_of = {i: c for _, i, c, _, _ in rows}
    assert all(cats[int(cate[k])] == cat_of[i] for k, i in items.items())
    assert list(items.values()) == sorted(items.values()), "ids in sorted raw-id order"
    # Raw timestamps survive (DSIN cuts sessions on them).
    times = {t for _, _, _, b, t in rows if b == "pv"}
    assert all(set(r["hist_timestamps"]) <= times for r in load_split(out, "train"))


def test_behavior_types_and_category_conflicts(tmp_path: Path) -> None:
    rows = random_taobao(seed=2)
    rows.append((rows[0][0], rows[0][1], 5555, "pv", rows[0][4] + 1))  # the same item, another category
    csv = write_taobao(tmp_path / "UserBehavior.csv", rows)
    meta = prepare_taobao(csv, tmp_path / "out", behavior_types=["pv", "buy"], keep_repeats=True)
    assert meta["ignored"]["other_behavior_types"] == sum(1 for r in rows if r[3] in ("cart", "fav"))
    assert meta["ignored"]["item_category_conflicts"] == 1
    assert meta["counts"]["behaviors"] == sum(1 for r in rows if r[3] in ("pv", "buy"))


def test_deterministic(tmp_path: Path) -> None:
    csv = write_taobao(tmp_path / "UserBehavior.csv", random_taobao(seed=3))
    prepare_taobao(csv, tmp_path / "a", seed=1, block_size=300)
    prepare_taobao(csv, tmp_path / "b", seed=1, block_size=1 << 20)  # the block size changes nothing
    a, b = file_bytes(tmp_path / "a"), file_bytes(tmp_path / "b")
    a.pop("experiment.yaml"), b.pop("experiment.yaml")
    assert a == b


def _lines(n: int = 200) -> list[str]:
    return [",".join(map(str, r)) for r in random_taobao(n_users=40, seed=4)][:n]


@pytest.mark.parametrize(
    "edits,line,reason",
    [
        ({5: "1,2,3,pv"}, 6, "malformed_line"),
        ({7: "1,2,3,pv,5,6"}, 8, "malformed_line"),
        ({9: "1,x,3,pv,5"}, 10, "bad_value"),
        ({3: "1,2,3,click,5"}, 4, "bad_value"),
        ({11: ""}, 12, "bad_value"),
        ({13: "1,2,3,p\u00ffv,5"}, 14, "bad_value"),  # not UTF-8
        ({150: "1,2,3,pv,-5"}, 151, "bad_value"),  # in a later block
    ],
    ids=["short", "long", "non-numeric", "type", "blank", "not-utf8", "late"],
)
def test_bad_line_raises_with_line_number(tmp_path: Path, edits: dict, line: int, reason: str) -> None:
    lines = _lines()
    for i, text in edits.items():
        lines[i] = text
    csv = write_lines(tmp_path / "UserBehavior.csv", lines, encoding="latin-1")
    with pytest.raises(PrepareError, match=rf"UserBehavior\.csv:{line}: "):
        prepare_taobao(csv, tmp_path / "out", block_size=400)
    meta = prepare_taobao(csv, tmp_path / "out", block_size=400, on_error="skip")
    entry = meta["skipped"]["UserBehavior.csv"][reason]
    assert entry["count"] == 1 and entry["first"].startswith(f"{csv}:{line}: ")


def test_skip_counts_and_line_numbers_after_skipped_lines(tmp_path: Path) -> None:
    lines = _lines()
    lines[2] = "1,2"  # malformed (skipped by the CSV parser)
    lines[4] = "9,9,9,9"  # malformed
    lines[150] = "1,2,3,pv,notatime"  # line 151, a later block: named 151 although two lines were dropped
    lines[180] = "1,2,3,zz,5"
    csv = write_lines(tmp_path / "UserBehavior.csv", lines)
    meta = prepare_taobao(csv, tmp_path / "out", block_size=300, on_error="skip")
    skipped = meta["skipped"]["UserBehavior.csv"]
    assert skipped["malformed_line"]["count"] == 2 and skipped["malformed_line"]["first"].startswith(
        f"{csv}:3: "
    )
    assert skipped["bad_value"]["count"] == 2 and skipped["bad_value"]["first"].startswith(f"{csv}:151: ")
    assert meta["counts"]["lines"] == len(lines) - 2


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match=r"UserBehavior\.csv: file does not exist"):
        prepare_taobao(tmp_path / "UserBehavior.csv", tmp_path / "out")
