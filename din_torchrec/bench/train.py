"""End-to-end training throughput of base, DIN, DIEN and DSIN on random batches.

Each model is the real one (``models.build_model``), sharded by ``distributed.sharding.shard_model`` (fused
row-wise Adagrad tables under DistributedModelParallel, world size 1), with ``dense_optimizer`` (Adam), and
every step is ``training.trainer.train_micro_step``, the trainer's own step. Batches come from
``data.random_batch.random_batch`` (a pool built beforehand, so no reading is timed; DIEN's batches carry
the negatives its auxiliary loss reads).

Reported per model:

* ``samples_per_s``: batch x steps / seconds of ``train_micro_step`` (best of interleaved rounds: every
  model is built first, then the rounds run model after model, so a noisy machine slows all of them alike);
* ``shares``: forward (embedding lookups + interaction + top MLP + loss), backward (including the fused
  table updates, which run inside it) and optimizer (clipping + dense Adam) fractions of a step, from
  separately instrumented steps that do what ``train_micro_step`` does with a clock between the parts;
* ``peak_rss_mb``: peak resident memory of the process while the model was built and warmed up (sampled
  every 5 ms), and ``peak_rss_delta_mb``: that peak minus the resident memory before the model was built.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from din_torchrec.utils.allocator import tune_malloc

MODELS = ("base", "din", "dien", "dsin")
# Variants: "din+bf16" (training.precision: bf16), "din+compile" (training.compile: torch.compile of the dense
# hot spots), "din+bf16+compile" (both).
VARIANTS = ("bf16", "compile")


def parse_label(label: str) -> tuple[str, set[str]]:
    """``"din+bf16+compile"`` -> ``("din", {"bf16", "compile"})``."""
    name, *flags = label.split("+")
    return name, set(flags)


def rss_mb() -> float:
    """Current resident memory of this process in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class PeakRSS:
    """Samples the resident memory in a background thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def _trim() -> None:
    """Return freed heap to the OS so the next model's baseline is honest."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class TrainSettings:
    models: list[str] = field(default_factory=lambda: list(MODELS))
    history: int = 50
    dim: int = 16
    batch: int = 1024
    lengths: str = "uniform"  # uniform in [1, history] or "full"
    items: int = 20_001
    categories: int = 101
    users: int = 20_001
    attention_hidden: list[int] = field(default_factory=lambda: [80, 40])
    mlp_hidden: list[int] = field(default_factory=lambda: [200, 80])
    activation: str = "dice"
    precision: str = "fp32"
    sparse_optimizer: str = "rowwise_adagrad"
    steps: int = 10
    warmup: int = 2
    rounds: int = 3
    pool: int = 4
    breakdown_steps: int = 3
    seed: int = 0


PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(
        history=8,
        dim=8,
        batch=32,
        items=501,
        categories=11,
        users=101,
        attention_hidden=[8],
        mlp_hidden=[8],
        steps=2,
        warmup=1,
        rounds=1,
        pool=2,
        breakdown_steps=1,
    ),
    "full": dict(history=50, dim=16, batch=1024, steps=10, rounds=3),
}


def bench_config(s: TrainSettings, model: str):
    """The experiment config of ``model`` at the settings' sizes (two sequence tables, three profile tables)."""
    from din_torchrec.config import ExperimentConfig, ProfileTableConfig, SequenceTableConfig

    cfg = ExperimentConfig()
    cfg.data.max_history = s.history
    cfg.data.batch_size = s.batch
    cfg.features.embedding_dim = s.dim
    cfg.features.sequence = [
        SequenceTableConfig("item", s.items, "target_item_id", "hist_item_ids"),
        SequenceTableConfig("category", s.categories, "target_cate_id", "hist_cate_ids"),
    ]
    cfg.features.profile = [
        ProfileTableConfig("user", s.users, "user_id"),
        ProfileTableConfig("age", 8, "user_age"),
        ProfileTableConfig("gender", 2, "user_gender"),
    ]
    cfg.model.name = model  # type: ignore[assignment]
    cfg.model.attention_hidden = list(s.attention_hidden)
    cfg.model.mlp_hidden = list(s.mlp_hidden)
    cfg.model.attention_activation = s.activation  # type: ignore[assignment]
    cfg.model.mlp_activation = s.activation  # type: ignore[assignment]
    if model == "dsin":
        width = s.dim * 2
        cfg.model.dsin.heads = next(h for h in (4, 2, 1) if width % h == 0)
    cfg.training.precision = s.precision  # type: ignore[assignment]
    cfg.training.sparse_optimizer = s.sparse_optimizer  # type: ignore[assignment]
    cfg.training.progress = False
    return cfg.validate()


@dataclass
class _Built:
    name: str
    cfg: Any
    model: Any
    opt: Any
    params: list[torch.Tensor]
    batches: list[Any]
    peak_rss_mb: float
    peak_rss_delta_mb: float
    build_seconds: float


def _build(s: TrainSettings, label: str, env: Any) -> _Built:
    from din_torchrec.data.random_batch import random_batch
    from din_torchrec.distributed.sharding import dense_optimizer, shard_model
    from din_torchrec.models import build_model
    from din_torchrec.training.trainer import needs_negatives, train_micro_step

    name, flags = parse_label(label)
    _trim()
    before = rss_mb()
    t0 = time.perf_counter()
    cfg = bench_config(s, name)
    if "bf16" in flags:
        cfg.training.precision = "bf16"  # type: ignore[assignment]
    cfg.training.compile = "compile" in flags
    g = torch.Generator().manual_seed(s.seed)
    batches = []
    for _ in range(s.pool):
        lengths = None
        if s.lengths == "full":
            lengths = torch.full((s.batch,), s.history, dtype=torch.int64)
        batches.append(
            random_batch(
                cfg.features,
                s.batch,
                s.history,
                g,
                min_history=1,
                lengths=lengths,
                with_negatives=needs_negatives(cfg),
            )
        )
    with PeakRSS() as peak:
        torch.manual_seed(s.seed)
        model = shard_model(build_model(cfg), env, cfg.features, cfg.training, s.batch)
        if cfg.training.compile:
            from din_torchrec.training.compile import compile_hot_paths

            compile_hot_paths(model)
        opt = dense_optimizer(model, cfg.training)
        params = list(opt.params.values())
        model.train()
        for i in range(s.warmup):
            train_micro_step(model, opt, params, batches[i % len(batches)], cfg, env)
    return _Built(
        label, cfg, model, opt, params, batches, peak.peak, peak.peak - before, time.perf_counter() - t0
    )


def _timed_steps(b: _Built, env: Any, steps: int) -> float:
    from din_torchrec.training.trainer import train_micro_step

    t0 = time.perf_counter()
    for i in range(steps):
        train_micro_step(b.model, b.opt, b.params, b.batches[i % len(b.batches)], b.cfg, env)
    return time.perf_counter() - t0


def _breakdown(b: _Built, env: Any, steps: int) -> dict[str, float]:
    """Seconds of forward / backward / optimizer / other, summed over ``steps`` instrumented steps that do
    what ``train_micro_step`` does (one micro-batch per step)."""
    from din_torchrec.training.trainer import _autocast, compute_loss

    t = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "other": 0.0}
    cfg = b.cfg
    _instrumented(b, env, steps, t, cfg, _autocast, compute_loss)
    return t


def _instrumented(
    b: _Built, env: Any, steps: int, t: dict[str, float], cfg: Any, _autocast, compute_loss
) -> None:
    for i in range(steps):
        c0 = time.perf_counter()
        batch = b.batches[i % len(b.batches)].to(env.device)
        b.opt.zero_grad()
        c1 = time.perf_counter()
        with _autocast(cfg, env.device):
            out = b.model(batch)
        loss, _ = compute_loss(out, batch, cfg, env.world_size, 1)
        c2 = time.perf_counter()
        loss.backward()
        c3 = time.perf_counter()
        if cfg.training.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(b.params, cfg.training.grad_clip_norm)
        b.opt.step()
        c4 = time.perf_counter()
        t["other"] += c1 - c0
        t["forward"] += c2 - c1
        t["backward"] += c3 - c2
        t["optimizer"] += c4 - c3


def run_train(
    s: TrainSettings, out_dir: str | Path, preset: str = "", log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Build every model, time interleaved rounds, write ``train.json`` and ``train.png``; return the JSON."""
    from din_torchrec.bench.embeddings import machine_info
    from din_torchrec.bench.plots import plot_train
    from din_torchrec.distributed.env import init_distributed

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [
        m for m in s.models if parse_label(m)[0] not in MODELS or not parse_label(m)[1] <= set(VARIANTS)
    ]
    if unknown:
        raise ValueError(
            f"bench train: unknown models {unknown}; known: {list(MODELS)}, each optionally with "
            f"+{' / +'.join(VARIANTS)}"
        )
    tune_malloc()  # as the trainer does (training.malloc_tuning)
    env = init_distributed("gloo")
    t_start = time.perf_counter()
    built = []
    for name in s.models:
        b = _build(s, name, env)
        built.append(b)
        log(
            f"built {name} in {b.build_seconds:.1f}s, peak {b.peak_rss_mb:.0f} MiB (+{b.peak_rss_delta_mb:.0f})"
        )
    times: dict[str, list[float]] = {b.name: [] for b in built}
    for _ in range(s.rounds):
        for b in built:
            times[b.name].append(_timed_steps(b, env, s.steps) / s.steps)
    results = []
    for b in built:
        parts = _breakdown(b, env, s.breakdown_steps)
        total = sum(parts.values())
        best = min(times[b.name])
        results.append(
            {
                "model": b.name,
                "samples_per_s": s.batch / best,
                "samples_per_s_median": s.batch / statistics.median(times[b.name]),
                "ms_per_step": best * 1e3,
                "shares": {k: v / total for k, v in parts.items()},
                "breakdown_ms_per_step": {k: 1e3 * v / s.breakdown_steps for k, v in parts.items()},
                "peak_rss_mb": b.peak_rss_mb,
                "peak_rss_delta_mb": b.peak_rss_delta_mb,
                "mean_history": float(
                    sum(float(x.hist_lengths.float().mean()) for x in b.batches) / len(b.batches)
                ),
            }
        )
        r = results[-1]
        log(
            f"{b.name:<5} {r['samples_per_s']:>10,.0f} samples/s  {r['ms_per_step']:.1f} ms/step  "
            + "  ".join(f"{k} {100 * v:.0f}%" for k, v in r["shares"].items())
        )
    report = {
        "benchmark": "train",
        "preset": preset,
        "machine": machine_info(),
        "settings": {**s.__dict__, "threads": torch.get_num_threads()},
        "results": results,
        "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "train.json").write_text(json.dumps(report, indent=2))
    plot_train(report, out / "train.png")
    return report
