"""``din-torchrec prepare``: the sub-commands, their JSON summary, exit codes and help."""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import pytest

from din_torchrec.data.prepare.cli import main, register
from tests.data.prepare.helpers import (
    meta_entries,
    random_reviews,
    random_taobao,
    write_amazon,
    write_lines,
    write_ml100k,
    write_taobao,
)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict | None, str]:
    rc = main(["prepare", *argv, "--quiet"])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out) if rc == 0 else None), captured.err


def test_amazon_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reviews, asins = random_reviews(seed=3)
    r, m = write_amazon(tmp_path, reviews, meta_entries(asins), gz=True)
    out = tmp_path / "out"
    args = ["amazon", "--reviews", str(r), "--meta", str(m), "--out", str(out)]
    rc, summary, _ = _run(capsys, *args, "--protocol", "dien", "--layout", "flat", "--seed", "4")
    assert rc == 0 and summary is not None
    assert summary["layout"] == "flat" and summary["protocol"] == "dien" and summary["skipped_total"] == 0
    assert summary["train"] == f"din-torchrec train --config {out / 'experiment.yaml'}"
    assert json.loads((out / "meta.json").read_text())["rows"] == summary["rows"]

    # A bad line: exit code 2 and the file and line on stderr; --on-error skip counts it.
    lines = r.read_bytes()
    bad = tmp_path / "reviews_bad.json"
    bad.write_bytes(b"not json\n" + gzip.decompress(lines))
    rc, _, err = _run(capsys, "amazon", "--reviews", str(bad), "--meta", str(m), "--out", str(out))
    assert rc == 2 and f"{bad}:1: " in err
    rc, summary, _ = _run(
        capsys, "amazon", "--reviews", str(bad), "--meta", str(m), "--out", str(out), "--on-error", "skip"
    )
    assert rc == 0 and summary["skipped_total"] == 1
    assert summary["skipped"]["reviews_bad.json"]["malformed_line"]["count"] == 1


def test_movielens_and_taobao_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ratings = [(u, m, 4, 1000 * u + m) for u in range(1, 9) for m in range(u % 3 + 1, 25, 3)]
    write_ml100k(tmp_path / "ml-100k", ratings, {m: [m % 19] for m in range(1, 26)})
    rc, summary, _ = _run(
        capsys,
        "movielens",
        "--dir",
        str(tmp_path / "ml-100k"),
        "--out",
        str(tmp_path / "ml"),
        "--min-rating",
        "4",
    )
    assert rc == 0 and summary["source"] == "movielens-100k" and summary["layout"] == "referenced"

    csv = write_taobao(tmp_path / "UserBehavior.csv", random_taobao(seed=5))
    rc, summary, _ = _run(
        capsys, "taobao", "--csv", str(csv), "--out", str(tmp_path / "tb"), "--max-history", "3"
    )
    assert rc == 0 and summary["source"] == "taobao"
    rc, _, err = _run(capsys, "taobao", "--csv", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "tb"))
    assert rc == 2 and "missing.csv: file does not exist" in err
    write_lines(tmp_path / "bad.csv", ["1,2,3,pv,4", "oops"])
    rc, _, err = _run(capsys, "taobao", "--csv", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "tb"))
    assert rc == 2 and "bad.csv:2: " in err
    rc, _, err = _run(
        capsys, "taobao", "--csv", str(csv), "--out", str(tmp_path / "tb"), "--max-history", "-1"
    )
    assert rc == 2 and "max_history" in err


@pytest.mark.parametrize("source", ["amazon", "movielens", "taobao"])
def test_help_and_register(source: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="din-torchrec")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)  # what the main CLI does
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["prepare", source, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text and "--on-error" in text and "--layout" in text
