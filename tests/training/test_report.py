"""``din-torchrec report`` trains several models on one dataset and writes the table and the curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from din_torchrec.data.generator import generate_dataset
from din_torchrec.training.report import markdown_table, rela_impr
from tests.conftest import SMALL_GENERATOR, small_experiment
from tests.test_cli import PNG_MAGIC, _cli


def test_rela_impr_formula() -> None:
    assert rela_impr(0.75, 0.70) == pytest.approx(25.0)
    assert rela_impr(0.70, 0.70) == 0.0
    assert rela_impr(0.6, 0.5) != rela_impr(0.6, 0.5)  # NaN when the baseline is at chance


def test_markdown_table_has_one_row_per_model() -> None:
    rows = [
        {"model": m, "auc": 0.7, "gauc": 0.69, "logloss": 0.5, "rela_impr_percent": 0.0, "train_samples_per_s": 1e4,
         "peak_rss_mb": 900.0}
        for m in ("base", "din")
    ]  # fmt: skip
    table = markdown_table(rows, "base")
    assert table.count("\n") == 4 and "| din | 0.7000 |" in table


@pytest.mark.slow
def test_report_on_a_small_generated_dataset(tmp_path: Path) -> None:
    import copy

    g = copy.deepcopy(SMALL_GENERATOR)
    g.train_samples, g.test_samples, g.sessions = 12_000, 3000, True
    data = tmp_path / "data"
    generate_dataset(g, data, progress=False)
    cfg = small_experiment(data, tmp_path / "runs", "din")
    cfg.data.generator = g
    cfg.training.epochs = 2
    cfg.training.max_steps_per_epoch = 6
    cfg.model.dsin.heads = 4
    cfg_path = tmp_path / "exp.yaml"
    from din_torchrec.config import dump_config

    cfg_path.write_text(dump_config(cfg))
    out = tmp_path / "report"
    r = _cli("report", "--config", str(cfg_path), "--out", str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert [row["model"] for row in report["rows"]] == ["base", "din", "dien", "dsin"]
    assert report["rows"][0]["rela_impr_percent"] == 0.0
    for row in report["rows"]:
        assert 0.0 < row["auc"] <= 1.0 and row["train_samples_per_s"] > 0
    md = (out / "report.md").read_text()
    assert md.count("\n| ") == 5 and "RelaImpr" in md  # header + 4 models
    assert (out / "validation_curves.png").read_bytes()[:8] == PNG_MAGIC
