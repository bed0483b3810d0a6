"""Peer comparison: this project's DIN / DIEN against DeepCTR-Torch's on the same generated dataset.

``din-torchrec bench compare`` (one run, JSON + PNG):

1. generates the dataset once (``din-torchrec generate``'s generator) into ``data_dir``;
2. exports it to padded numpy arrays for DeepCTR-Torch (``train.npz`` / ``test.npz``: histories padded with
   0 to ``history``, and for DIEN one uniform random negative item per position with its category, as this
   project's uniform negative sampler draws them);
3. makes DeepCTR-Torch's virtualenv if it is missing (``benchmarks/.venv-deepctr``: ``python -m venv``,
   ``pip install torch==2.13.0`` (the local CPU wheel; never unpinned), ``pip install --no-deps
   deepctr-torch``, then its light dependencies ``scikit-learn tqdm requests``);
4. for each model, trains this project's (``din-torchrec train`` in a subprocess: the real trainer, parquet
   reader included) and DeepCTR-Torch's (``benchmarks/deepctr_side.py`` in its venv) with the same
   embedding dim, history length, attention and MLP hidden sizes, activations, batch, epochs and threads,
   and prints test AUC and training samples/s side by side.

What differs by design (each side's defaults): optimizers (here fused row-wise Adagrad for the tables and
Adam for the rest; DeepCTR-Torch Adam for everything), regularisation (here mini-batch-aware L2 1e-4 on the
looked-up rows; DeepCTR-Torch L2 1e-6 on the whole tables), and where the data comes from (here streamed
from parquet inside the timed loop; DeepCTR-Torch in-memory tensors). Timed: training epochs only, not
evaluation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
PEER_SCRIPT = REPO_ROOT / "benchmarks" / "deepctr_side.py"
DEFAULT_VENV = REPO_ROOT / "benchmarks" / ".venv-deepctr"
PEER_PACKAGES = ["scikit-learn", "tqdm", "requests"]  # requests: deepctr_torch imports it (a version check)


@dataclass
class CompareSettings:
    models: list[str] = field(default_factory=lambda: ["din", "dien"])
    dim: int = 16
    history: int = 50
    attention_hidden: list[int] = field(default_factory=lambda: [80, 40])
    mlp_hidden: list[int] = field(default_factory=lambda: [200, 80])
    attention_activation: str = "dice"
    mlp_activation: str = "relu"  # DeepCTR-Torch's DNN cannot use Dice on 2-D inputs
    batch: int = 1024
    epochs: int = 2
    train_samples: int = 300_000
    test_samples: int = 50_000
    users: int = 20_000
    items: int = 20_000
    categories: int = 100
    threads: int = 0
    seed: int = 0
    data_dir: str = "runs/bench/compare_data"
    runs_dir: str = "runs/bench/compare_runs"  # this project's training outputs (checkpoints): not in --out
    venv: str = str(DEFAULT_VENV)
    peer: bool = True
    repeats: int = 1  # each contender runs this many times, order alternating; the best samples/s counts
    # Also run this project's models as these variants ("compile": training.compile, "bf16":
    # training.precision bf16, "bf16+compile": both); the plain fp32 eager run always runs.
    variants: list[str] = field(default_factory=lambda: ["compile", "bf16+compile"])

    @classmethod
    def small(cls) -> CompareSettings:
        return cls(
            models=["din"],
            dim=8,
            history=10,
            attention_hidden=[8],
            mlp_hidden=[8],
            batch=128,
            epochs=1,
            train_samples=2000,
            test_samples=500,
            users=300,
            items=300,
            categories=10,
            data_dir="runs/bench/compare_data_small",
            runs_dir="runs/bench/compare_runs_small",
        )


def generator_config(s: CompareSettings):
    from din_torchrec.config import GeneratorConfig

    return GeneratorConfig(
        num_users=s.users,
        num_items=s.items,
        num_categories=s.categories,
        train_samples=s.train_samples,
        test_samples=s.test_samples,
        max_history=s.history,
        seed=s.seed,
    )


def experiment_config(s: CompareSettings, model: str, out_dir: Path):
    from din_torchrec.config import ExperimentConfig, ProfileTableConfig, SequenceTableConfig

    g = generator_config(s)
    cfg = ExperimentConfig()
    cfg.data.dir = str(Path(s.data_dir).resolve())
    cfg.data.generator = g
    cfg.data.max_history = s.history
    cfg.data.batch_size = s.batch
    # DeepCTR-Torch trains on numpy arrays loaded before its clock starts; here the rows are read and checked
    # into memory when the Trainer is built (data.cache_in_memory), and each epoch shuffles, batches and
    # samples negatives from there, on the clock.
    cfg.data.cache_in_memory = True
    cfg.features.embedding_dim = s.dim
    cfg.features.sequence = [
        SequenceTableConfig("item", g.num_items + 1, "target_item_id", "hist_item_ids"),
        SequenceTableConfig("category", g.num_categories + 1, "target_cate_id", "hist_cate_ids"),
    ]
    cfg.features.profile = [
        ProfileTableConfig("user", g.num_users + 1, "user_id"),
        ProfileTableConfig("age", g.num_age_buckets, "user_age"),
        ProfileTableConfig("gender", 2, "user_gender"),
    ]
    cfg.model.name = model  # type: ignore[assignment]
    cfg.model.attention_hidden = list(s.attention_hidden)
    cfg.model.mlp_hidden = list(s.mlp_hidden)
    cfg.model.attention_activation = s.attention_activation  # type: ignore[assignment]
    cfg.model.mlp_activation = s.mlp_activation  # type: ignore[assignment]
    cfg.model.attention_normalization = "none"  # type: ignore[assignment]  # DeepCTR DIN: no normalisation
    cfg.training.epochs = s.epochs
    cfg.training.seed = s.seed
    cfg.training.progress = False
    cfg.training.log_every = 10**9
    cfg.training.regularization.coefficient = 1e-4
    cfg.training.output_dir = str(out_dir.resolve())
    cfg.training.num_threads = s.threads
    return cfg.validate()


def _read_split(path: Path, history: int) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet"))
    cols = [
        "user_id",
        "user_age",
        "user_gender",
        "target_item_id",
        "target_cate_id",
        "label",
        "hist_item_ids",
        "hist_cate_ids",
    ]
    tables = [pq.read_table(f, columns=cols) for f in files]
    out: dict[str, list[np.ndarray]] = {
        k: []
        for k in (
            "user_id",
            "user_age",
            "user_gender",
            "item_id",
            "cate_id",
            "label",
            "hist_item_id",
            "hist_cate_id",
            "seq_length",
        )
    }
    for t in tables:
        n = t.num_rows
        for src, dst in (
            ("user_id", "user_id"),
            ("user_age", "user_age"),
            ("user_gender", "user_gender"),
            ("target_item_id", "item_id"),
            ("target_cate_id", "cate_id"),
            ("label", "label"),
        ):
            out[dst].append(t.column(src).to_numpy())
        for src, dst in (("hist_item_ids", "hist_item_id"), ("hist_cate_ids", "hist_cate_id")):
            col = t.column(src).combine_chunks()
            offsets = col.offsets.to_numpy()
            values = col.values.to_numpy()
            lengths = np.diff(offsets)
            keep = np.minimum(lengths, history)  # most recent `history`, oldest first (the reader's rule)
            padded = np.zeros((n, history), dtype=np.int64)
            pos = np.arange(history)[None, :]
            take = pos < keep[:, None]
            start = offsets[1:] - keep
            idx = (start[:, None] + pos)[take]
            padded[take] = values[idx]
            out[dst].append(padded)
            if dst == "hist_item_id":
                out["seq_length"].append(keep.astype(np.int64))
    return {k: np.concatenate(v) for k, v in out.items()}


def export_arrays(s: CompareSettings, out_dir: Path) -> Path:
    """Padded numpy arrays of the train and test splits for DeepCTR-Torch (done once per dataset)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "sizes.json").exists():
        return out_dir
    data = Path(s.data_dir)
    g = generator_config(s)
    cats = np.load(data / "item_features.npz")["category"]
    rng = np.random.default_rng(s.seed + 7)
    for split, name in (("train", "train"), ("test", "test")):
        arrays = _read_split(data / split, s.history)
        mask = np.arange(s.history)[None, :] < arrays["seq_length"][:, None]
        neg = rng.integers(1, g.num_items + 1, size=mask.shape) * mask
        arrays["neg_hist_item_id"] = neg
        arrays["neg_hist_cate_id"] = cats[neg] * mask
        np.savez(out_dir / f"{name}.npz", **arrays)
    sizes = {
        "user": g.num_users + 1,
        "age": g.num_age_buckets,
        "gender": 2,
        "item": g.num_items + 1,
        "category": g.num_categories + 1,
    }
    (out_dir / "sizes.json").write_text(json.dumps(sizes))
    return out_dir


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_peer_venv(venv: str | Path, log=print) -> Path:
    """DeepCTR-Torch's virtualenv, created on first use (torch pinned to the local CPU wheel)."""
    venv = Path(venv)
    py = _venv_python(venv)
    if (
        py.exists()
        and subprocess.run([str(py), "-c", "import deepctr_torch, sklearn"], capture_output=True).returncode
        == 0
    ):
        return py
    log(
        f"creating DeepCTR-Torch's virtualenv in {venv} (torch==2.13.0, deepctr-torch --no-deps, {' '.join(PEER_PACKAGES)})"
    )
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # pinned: an unpinned torch is a multi-GB CUDA build
    subprocess.run([*pip, "--no-deps", "deepctr-torch"], check=True)
    subprocess.run([*pip, *PEER_PACKAGES], check=True)
    return py


def _run(cmd: list[str], log, env: dict[str, str] | None = None) -> None:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def run_ours(s: CompareSettings, model: str, out: Path, log, variant: str = "") -> dict[str, Any]:
    from din_torchrec.bench.train import VARIANTS, parse_label
    from din_torchrec.config import dump_config

    _, flags = parse_label(f"{model}+{variant}" if variant else model)
    unknown = flags - set(VARIANTS)
    if unknown:
        raise ValueError(
            f"bench compare: unknown variant flags {sorted(unknown)} (known: {', '.join(VARIANTS)})"
        )
    run_dir = Path(s.runs_dir) / f"ours_{model}{'_' + variant.replace('+', '_') if variant else ''}"
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = experiment_config(s, model, run_dir)
    if "bf16" in flags:
        cfg.training.precision = "bf16"  # type: ignore[assignment]
    cfg.training.compile = "compile" in flags
    (run_dir / "experiment.yaml").write_text(dump_config(cfg))
    env = dict(os.environ)
    env.pop("WORLD_SIZE", None)
    _run(
        [sys.executable, "-m", "din_torchrec.cli", "train", "--config", str(run_dir / "experiment.yaml")],
        log,
        env,
    )
    m = json.loads((run_dir / "metrics.json").read_text())
    return {
        "implementation": "din_torchrec" + (f"+{variant}" if variant else ""),
        "model": model,
        "auc": m["final"]["auc"],
        "logloss": m["final"]["logloss"],
        "gauc": m["final"].get("gauc"),
        "train_samples_per_s": m["train_samples_per_s"],
        "train_seconds": m["train_seconds"],
        "epochs": [
            {k: e[k] for k in ("epoch", "auc", "logloss", "train_samples_per_s") if k in e}
            for e in m["epochs"]
        ],
        "peak_rss_mb": m["peak_rss_mb"],
    }


def run_peer(s: CompareSettings, model: str, arrays: Path, out: Path, py: Path, log) -> dict[str, Any]:
    result = out / f"deepctr_{model}.json"
    cmd = [
        str(py),
        str(PEER_SCRIPT),
        "--data", str(arrays),
        "--model", model,
        "--dim", str(s.dim),
        "--history", str(s.history),
        "--att-hidden", ",".join(map(str, s.attention_hidden)),
        "--mlp-hidden", ",".join(map(str, s.mlp_hidden)),
        "--att-activation", s.attention_activation,
        "--mlp-activation", s.mlp_activation,
        "--batch", str(s.batch),
        "--epochs", str(s.epochs),
        "--threads", str(s.threads),
        "--seed", str(s.seed),
        "--out", str(result),
    ]  # fmt: skip
    _run(cmd, log)
    return json.loads(result.read_text())


def run_compare(s: CompareSettings, out_dir: str | Path, log=print) -> dict[str, Any]:
    from din_torchrec.bench.embeddings import machine_info
    from din_torchrec.bench.plots import implementation_rank, plot_compare
    from din_torchrec.data.generator import generate_dataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    data = Path(s.data_dir)
    g = generator_config(s)
    meta = data / "meta.json"
    from din_torchrec.config import to_dict

    if not (meta.exists() and json.loads(meta.read_text()).get("generator") == to_dict(g)):
        log(f"generating {s.train_samples:,} + {s.test_samples:,} samples into {data}")
        generate_dataset(g, data, progress=False)
    py = None
    arrays = None
    if s.peer:
        py = ensure_peer_venv(s.venv, log)
        arrays = export_arrays(s, data / "deepctr_arrays")
    runs: list[dict[str, Any]] = []
    for rep in range(max(1, s.repeats)):
        # Alternate who goes first, so that a change in the machine's load hits both sides alike.
        for model in s.models:
            contenders = (
                [("ours", "")] + [("ours", v) for v in s.variants if v] + ([("peer", "")] if s.peer else [])
            )
            if rep % 2 == 1:
                contenders.reverse()
            for side, variant in contenders:
                if side == "ours":
                    r = run_ours(s, model, out, log, variant)
                else:
                    assert py is not None and arrays is not None
                    r = run_peer(s, model, arrays, out, py, log)
                r["repeat"] = rep
                runs.append(r)
                log(
                    f"{r['implementation']:<17} {model}: AUC {r['auc']:.4f}  {r['train_samples_per_s']:,.0f} samples/s"
                )
    # Per (model, implementation): the run with the best samples/s (the least disturbed; AUCs are seeded).
    results = []
    runs.sort(
        key=lambda x: (s.models.index(x["model"]), implementation_rank(x["implementation"]), x["repeat"])
    )
    for r in runs:
        same = [x for x in runs if x["model"] == r["model"] and x["implementation"] == r["implementation"]]
        if r is max(same, key=lambda x: x["train_samples_per_s"]):
            results.append({**r, "runs": len(same)})
    ratios = {}
    for model in s.models:
        peer = next(
            (r for r in results if r["model"] == model and r["implementation"] == "deepctr_torch"), None
        )
        for ours in (
            r for r in results if r["model"] == model and r["implementation"].startswith("din_torchrec")
        ):
            if peer:
                ratios[f"{model} {ours['implementation']}"] = {
                    "samples_per_s_ratio": ours["train_samples_per_s"] / peer["train_samples_per_s"],
                    # Last epoch only: without start-up costs (compilation, first-touch allocations).
                    "last_epoch_samples_per_s_ratio": ours["epochs"][-1]["train_samples_per_s"]
                    / peer["epochs"][-1]["train_samples_per_s"],
                    "auc_difference": ours["auc"] - peer["auc"],
                }
    print()
    print(
        f"{'model':<6} {'implementation':<17} {'AUC':>7} {'logloss':>8} {'train samples/s':>16} {'peak MiB':>9}"
    )
    for r in results:
        print(
            f"{r['model']:<6} {r['implementation']:<17} {r['auc']:>7.4f} {r['logloss']:>8.4f} "
            f"{r['train_samples_per_s']:>16,.0f} {r.get('peak_rss_mb', 0):>9.0f}"
        )
    for key, q in ratios.items():
        print(
            f"{key} / deepctr_torch: samples/s x{q['samples_per_s_ratio']:.1f} (last epoch "
            f"x{q['last_epoch_samples_per_s_ratio']:.1f}), AUC difference {q['auc_difference']:+.4f}"
        )
    report = {
        "benchmark": "compare",
        "machine": machine_info(),
        "settings": asdict(s),
        "results": results,
        "all_runs": runs,
        "ratios": ratios,
        "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    plot_compare(report, out / "compare.png")
    return report
