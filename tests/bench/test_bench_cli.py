"""Every benchmark runs from the CLI in its small configuration and writes well-formed JSON and PNG (speed is
not checked here)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from din_torchrec.bench import cli
from tests.training.test_compile import HAS_CXX

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[2]


def _check_png(path: Path) -> None:
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _load(path: Path) -> dict:
    report = json.loads(path.read_text())
    assert report["results"], f"{path}: no results"
    return report


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def test_register_adds_the_bench_command_with_its_subcommands() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    for name in ("embeddings", "train", "compare", "gpu-check", "kernels", "prefetch"):
        args = parser.parse_args(["bench", name, "--small"])
        assert callable(args.func), name


def _embeddings(tmp_path: Path, *extra: str) -> dict:
    assert cli.main(["bench", "embeddings", "--small", "--threads", "1", "--out", str(tmp_path), *extra]) == 0
    return _load(tmp_path / "embeddings.json")


@pytest.mark.slow
def test_bench_embeddings_small_world_size_2(tmp_path: Path) -> None:
    """The two-process (gloo) sharded lookups of the small preset."""
    report = _embeddings(tmp_path)
    ws2 = [r for r in report["results"] if r["world_size"] == 2]
    assert ws2 and all(r["kernel"] == "torchrec_ebc" and r["sharding"] == "row_wise" for r in ws2)
    assert all(r["lookups_per_s"] > 0 for r in ws2)


def test_bench_embeddings_small(tmp_path: Path) -> None:
    report = _embeddings(tmp_path, "--no-multiprocess")
    _check_png(tmp_path / "embeddings.png")
    assert report["memory_bandwidth"]["best_gbs"] > 0
    kernels = {(r["kernel"], r["mode"], r["world_size"]) for r in report["results"]}
    for k in [
        ("nn_embeddingbag", "fwd", 1),
        ("fbgemm_tbe", "fwd", 1),
        ("fbgemm_tbe", "train", 1),
        ("torchrec_ebc", "fwd", 1),
        ("torchrec_ec", "fwd", 1),
        ("fbgemm_intn", "fwd", 1),
    ] + (
        [
            ("torchrec_ebc_native", "fwd", 1),
            ("torchrec_ebc_native", "train", 1),
            ("torchrec_ec_native", "fwd", 1),
        ]
        if HAS_CXX
        else []
    ):
        assert k in kernels, f"missing {k}"
    assert {r["dtype"] for r in report["results"]} >= {"fp32", "fp16", "int8", "int4"}
    for r in report["results"]:
        assert r["lookups_per_s"] > 0 and _finite(r["fraction_of_bandwidth"]), r
        assert r["row_gbs"] == pytest.approx(r["lookups_per_s"] * r["row_bytes"] / 1e9)


def test_bench_train_small(tmp_path: Path) -> None:
    models = "base,din,dien,dsin,din+bf16," + ("dien+bf16+compile" if HAS_CXX else "dien+bf16")
    assert (
        cli.main(["bench", "train", "--small", "--threads", "1", "--models", models, "--out", str(tmp_path)])
        == 0
    )
    report = _load(tmp_path / "train.json")
    _check_png(tmp_path / "train.png")
    assert [r["model"] for r in report["results"]] == models.split(",")
    for r in report["results"]:
        assert r["samples_per_s"] > 0 and r["peak_rss_mb"] > 0
        assert sum(r["shares"].values()) == pytest.approx(1.0)
        assert set(r["shares"]) == {"forward", "backward", "optimizer", "other"}


def test_bench_kernels_small_and_every_fast_path_agrees_with_its_reference(tmp_path: Path) -> None:
    assert cli.main(["bench", "kernels", "--small", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = _load(tmp_path / "kernels.json")
    _check_png(tmp_path / "kernels.png")
    names = {r["name"] for r in report["results"]}
    assert {
        "din_attention",
        "din_scores",
        "dien_extractor",
        "dien_extractor_vs_packed_gru",
        "dien_evolution",
        "dien_evolution_vs_autograd_loop",
        "dien_aux_kernel",
        "linear_fp32",
        "dsin_extractor",
        "seq_embedding_backward",
    } <= names
    for r in report["results"]:
        assert r["max_abs_diff"] < 1e-4, r
        if r["backward"]:
            assert r["max_abs_grad_diff"] < 1e-4, r
        assert r["speedup"] > 0


def test_bench_prefetch_small(tmp_path: Path) -> None:
    assert cli.main(["bench", "prefetch", "--small", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = _load(tmp_path / "prefetch.json")
    _check_png(tmp_path / "prefetch.png")
    assert {r["name"] for r in report["results"]} == {
        "reader only",
        "step only",
        "sequential",
        "prefetch (depth 2)",
    }
    assert report["summary"]["speedup_over_sequential"] > 0


def test_gpu_check_runs_on_cpu_without_fbgemm_or_torchrec(tmp_path: Path) -> None:
    """In a fresh interpreter where importing fbgemm_gpu or torchrec fails, as on a stock-PyTorch GPU box."""
    script = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("fbgemm_gpu", "torchrec"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import torch
torch.set_num_threads(1)
from din_torchrec.bench.gpu_check import main
code = main(["--small", "--device", "cpu", "--out", {str(tmp_path)!r}])
assert "torchrec" not in sys.modules
assert getattr(sys.modules["fbgemm_gpu"], "_din_torchrec_stub", False)
sys.exit(code)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = _load(tmp_path / "gpu_check.json")
    _check_png(tmp_path / "gpu_check.png")
    assert report["torchrec_imported"] is False
    assert report["complete"] is True
    assert {r["dtype"] for r in report["results"]} == {"fp32", "bf16"}
    fp32 = [r for r in report["results"] if r["dtype"] == "fp32"]
    assert fp32 and all("error" not in r and r["max_abs_diff"] < 1e-4 for r in fp32), fp32


def test_bench_compare_small_without_the_peer_and_the_peer_arrays(tmp_path: Path) -> None:
    """This project's side end to end (the peer needs its own virtualenv: see docs/benchmarks.md), and the
    arrays exported for DeepCTR-Torch match the parquet rows."""
    import pyarrow.parquet as pq

    from din_torchrec.bench.compare import CompareSettings, export_arrays

    data = tmp_path / "data"
    argv = ["bench", "compare", "--small", "--no-peer", "--variants", "none", "--threads", "1"]
    argv += ["--data", str(data), "--runs", str(tmp_path / "runs"), "--out", str(tmp_path)]
    code = cli.main(argv)
    assert code == 0
    report = _load(tmp_path / "compare.json")
    _check_png(tmp_path / "compare.png")
    (ours,) = report["results"]
    assert (
        ours["implementation"] == "din_torchrec" and 0 <= ours["auc"] <= 1 and ours["train_samples_per_s"] > 0
    )

    s = CompareSettings.small()
    s.data_dir = str(data)
    arrays = export_arrays(s, tmp_path / "arrays")
    train = np.load(arrays / "train.npz")
    table = pq.read_table(sorted((data / "train").glob("*.parquet"))[0])
    n = min(50, table.num_rows)
    hist = table.column("hist_item_ids").to_pylist()[:n]
    for i in range(n):
        want = hist[i][-s.history :]
        k = len(want)
        assert train["seq_length"][i] == k
        assert train["hist_item_id"][i, :k].tolist() == want and not train["hist_item_id"][i, k:].any()
        neg = train["neg_hist_item_id"][i]
        assert (neg[:k] >= 1).all() and not neg[k:].any()
    assert train["label"][:n].tolist() == table.column("label").to_pylist()[:n]


def test_gpu_check_keeps_the_finished_cases_of_a_run_cut_off(tmp_path: Path) -> None:
    """A lent GPU's time limit kills the run mid-way: the JSON written after each case must hold the cases
    finished before, marked incomplete (the log callback stands in for the kill, on the second case)."""
    from din_torchrec.bench.gpu_check import run

    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if len(lines) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, small=True, device="cpu", log=log, cases=["din_scores", "dsin_sessions"])
    report = _load(tmp_path / "gpu_check.json")
    assert report["complete"] is False
    assert [(r["name"], r["dtype"]) for r in report["results"]] == [("din_scores", "fp32")]
