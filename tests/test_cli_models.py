"""The shipped DIEN and DSIN configs run end to end from the CLI: one process and two gloo processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.test_cli import _cli, _run

ROOT = Path(__file__).resolve().parents[1]
CASES = [("configs/dien_drift.yaml", "dien"), ("configs/dsin_sessions.yaml", "dsin")]


def _small(data: Path, out: Path) -> list[str]:
    return [
        "--set", f"data.dir={data}",
        "--set", "data.generator.train_samples=12000",
        "--set", "data.generator.test_samples=3000",
        "--set", "data.batch_size=256",
        "--set", "data.eval_batch_size=1024",
        "--set", "data.shuffle_buffer=4096",
        "--set", "training.epochs=1",
        "--set", "training.max_steps_per_epoch=8",
        "--set", "training.progress=false",
        "--set", f"training.output_dir={out}",
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("config,model", CASES, ids=[m for _, m in CASES])
def test_shipped_config_trains_on_one_and_two_processes(tmp_path: Path, config: str, model: str) -> None:
    data = tmp_path / "data"
    gen = _cli("generate", "--config", config, "--quiet", *_small(data, tmp_path / "unused"))
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert (data / "item_features.npz").exists()

    one = _cli("train", "--config", config, *_small(data, tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-4000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert m1["model"] == model and m1["world_size"] == 1 and m1["steps"] == 8
    assert m1["final"]["samples"] == 3000

    two = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "din_torchrec.cli", "train", "--config", config, *_small(data, tmp_path / "two")],
        env_extra={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    m2 = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert m2["model"] == model and m2["world_size"] == 2 and m2["steps"] == 8
    assert m2["final"]["samples"] == 3000
