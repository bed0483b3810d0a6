"""The command line end to end: generate -> train -> evaluate, one process and two (torchrun), and errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from din_torchrec.config import dump_config
from tests.conftest import small_experiment

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(args: list[str], timeout: int = 300, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "din_torchrec.cli", *args], **kw)


def _write_config(tmp_path: Path, data_dir: Path, out_dir: Path, **training) -> Path:
    cfg = small_experiment(data_dir, out_dir, "din")
    cfg.training.epochs = 1
    for k, v in training.items():
        setattr(cfg.training, k, v)
    p = tmp_path / "exp.yaml"
    p.write_text(dump_config(cfg))
    return p


@pytest.mark.parametrize("command", [[], ["generate"], ["train"], ["evaluate"], ["demo"]])
def test_help(command: list[str]) -> None:
    r = _cli(*command, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: din-torchrec" in r.stdout


@pytest.mark.slow
def test_generate_train_evaluate_round_trip(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg_path = _write_config(tmp_path, data, tmp_path / "run", max_steps_per_epoch=30)
    gen = _cli(
        "generate",
        "--config",
        str(cfg_path),
        "--quiet",
        "--set",
        "data.generator.train_samples=20000",
        "--set",
        "data.generator.test_samples=5000",
    )
    assert gen.returncode == 0, gen.stderr
    assert json.loads(gen.stdout)["rows"] == {"train": 20000, "test": 5000}

    tr = _cli("train", "--config", str(cfg_path))
    assert tr.returncode == 0, tr.stderr[-3000:]
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["world_size"] == 1 and metrics["steps"] == 30
    assert 0.5 < metrics["final"]["auc"] <= 1.0
    assert (run / "training_curve.png").read_bytes()[:8] == PNG_MAGIC
    assert (run / "checkpoint" / "meta.json").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == "din"

    out = tmp_path / "eval.json"
    ev = _cli("evaluate", "--config", str(cfg_path), "--output", str(out))
    assert ev.returncode == 0, ev.stderr[-3000:]
    reloaded = json.loads(out.read_text())
    # Same weights, same data: the reloaded checkpoint reproduces the metrics of the end of training.
    for key in ("auc", "gauc", "logloss"):
        assert reloaded[key] == pytest.approx(metrics["final"][key], abs=1e-6), key


@pytest.mark.slow
def test_two_process_training_under_torchrun(tmp_path: Path, small_dataset: Path) -> None:
    cfg_path = _write_config(tmp_path, small_dataset, tmp_path / "run2", max_steps_per_epoch=20)
    r = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "din_torchrec.cli",
            "train",
            "--config",
            str(cfg_path),
        ],
        # A rank that aborts prints every thread's Python stack (faulthandler), so a failure shows where.
        env_extra={"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
    )
    assert r.returncode == 0, f"stdout:\n{r.stdout[-2000:]}\nstderr:\n{r.stderr[-4000:]}"
    metrics = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["steps"] == 20
    assert metrics["final"]["samples"] == 12_000, "every eval row counted once across the two ranks"
    assert metrics["final"]["auc"] > 0.55
    plan = json.loads((tmp_path / "run2" / "plan.json").read_text())
    assert {row["table"] for row in plan} == {"item", "category", "user", "age", "gender"}
    # A checkpoint written by 2 ranks loads into 1 process and gives the same metrics.
    ev = _cli("evaluate", "--config", str(cfg_path))
    assert ev.returncode == 0, ev.stderr[-3000:]
    # Within tolerance only: 1 and 2 ranks sum in different orders (seen: 1.7e-5 apart).
    assert json.loads(ev.stdout)["auc"] == pytest.approx(metrics["final"]["auc"], abs=5e-4)


def test_unknown_config_key_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("training:\n  learning_rate: 0.1\n")
    r = _cli("train", "--config", str(p))
    assert r.returncode == 2
    assert "training.learning_rate: unknown key" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_data_file_is_a_clear_error(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    table = pa.table({"user_id": pa.array([1, 2], pa.int64()), "label": pa.array([0.0, 1.0], pa.float32())})
    pq.write_table(table, data / "train" / "part-0.parquet")
    pq.write_table(table, data / "test" / "part-0.parquet")
    cfg_path = _write_config(tmp_path, data, tmp_path / "run")
    r = _cli("train", "--config", str(cfg_path), "--set", "training.regularization.coefficient=0")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "part-0.parquet" in r.stderr and "target_item_id': missing column" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_rank_of_multi_process_job_exits_without_finalization(tmp_path: Path, world_size: str) -> None:
    """``run()``: a rank of a multi-process job (WORLD_SIZE > 1) leaves through ``os._exit`` -- no atexit
    handlers, no interpreter teardown for gloo's or Arrow's threads to trip over -- yet with ``main``'s exit
    status and all of its (block-buffered, piped) output; a single process exits normally."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('FINALIZED'))\n"
        "from din_torchrec.cli import run\n"
        "sys.argv = ['din-torchrec', *sys.argv[1:]]\n"
        "run()\n"
    )
    out = tmp_path / "data"
    ok = _run(
        [
            sys.executable,
            "-c",
            code,
            "generate",
            "--quiet",
            "--out",
            str(out),
            "--set",
            "data.generator.train_samples=300",
            "--set",
            "data.generator.test_samples=100",
        ],
        env_extra={"WORLD_SIZE": world_size, "PYTHONUNBUFFERED": ""},
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert json.loads(ok.stdout.replace("FINALIZED", ""))["rows"] == {"train": 300, "test": 100}
    assert ("FINALIZED" in ok.stdout) == (world_size == "1")

    bad = _run(
        [sys.executable, "-c", code, "train", "--config", str(tmp_path / "missing.yaml")],
        env_extra={"WORLD_SIZE": world_size, "PYTHONUNBUFFERED": ""},
    )
    assert bad.returncode == 2, bad.stderr
    assert "missing.yaml" in bad.stderr
