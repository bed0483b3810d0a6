"""Pipelined input, measured: DIN training on a generated parquet dataset read by the real
:class:`~din_torchrec.data.reader.BehaviorReader`, with and without
:class:`~din_torchrec.modules.prefetch.Prefetcher` (a background thread reading the next batches).

Contenders, timed in interleaved rounds over the same steps (best round counts):

* ``reader only``: iterate the reader (no training): the input cost per batch;
* ``step only``: ``train_micro_step`` on batches already in memory: the compute cost per batch;
* ``sequential``: the trainer's loop, reading then computing;
* ``prefetch``: the same loop over ``Prefetcher(reader, depth)``.

Perfect overlap would make ``prefetch`` take ``max(reader, step)`` instead of ``reader + step``; the JSON
gives both bounds.
"""

from __future__ import annotations

import copy
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _config(data_dir: Path, small: bool):
    from din_torchrec.config import ExperimentConfig, GeneratorConfig, ProfileTableConfig, SequenceTableConfig

    g = GeneratorConfig(
        num_users=2000 if small else 20_000,
        num_items=2000 if small else 20_000,
        num_categories=40 if small else 100,
        train_samples=4000 if small else 120_000,
        test_samples=1000 if small else 10_000,
        max_history=20 if small else 50,
        rows_per_file=100_000,
        row_group_size=2048 if small else 16_384,
        seed=5,
    )
    cfg = ExperimentConfig()
    cfg.data.dir = str(data_dir)
    cfg.data.generator = copy.deepcopy(g)
    cfg.data.max_history = g.max_history
    cfg.data.batch_size = 128 if small else 1024
    cfg.data.shuffle_buffer = 2048 if small else 65_536
    cfg.data.read_chunk_rows = 2048 if small else 65_536
    cfg.features.embedding_dim = 8 if small else 16
    cfg.features.sequence = [
        SequenceTableConfig("item", g.num_items + 1, "target_item_id", "hist_item_ids"),
        SequenceTableConfig("category", g.num_categories + 1, "target_cate_id", "hist_cate_ids"),
    ]
    cfg.features.profile = [
        ProfileTableConfig("user", g.num_users + 1, "user_id"),
        ProfileTableConfig("age", g.num_age_buckets, "user_age"),
        ProfileTableConfig("gender", 2, "user_gender"),
    ]
    cfg.model.name = "din"  # type: ignore[assignment]
    if small:
        cfg.model.attention_hidden = [8]
        cfg.model.mlp_hidden = [8]
    cfg.training.progress = False
    cfg.training.regularization.coefficient = 1e-4
    return cfg.validate()


def run_prefetch(
    out_dir: str | Path,
    small: bool = False,
    data_dir: str | None = None,
    steps: int = 0,
    depth: int = 2,
    rounds: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    from din_torchrec.bench.embeddings import machine_info
    from din_torchrec.bench.plots import plot_prefetch
    from din_torchrec.data.generator import generate_dataset
    from din_torchrec.data.reader import load_frequencies
    from din_torchrec.distributed.env import init_distributed
    from din_torchrec.distributed.sharding import dense_optimizer, shard_model
    from din_torchrec.models import build_model
    from din_torchrec.modules.prefetch import Prefetcher
    from din_torchrec.training.trainer import make_reader, train_micro_step

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(data_dir) if data_dir else out / ("prefetch_data_small" if small else "prefetch_data")
    cfg = _config(data, small)
    if not (data / "meta.json").exists():
        log(f"generating {cfg.data.generator.train_samples:,} samples into {data}")
        generate_dataset(cfg.data.generator, data, progress=False)
    steps = steps or (6 if small else 40)
    rounds = rounds or (1 if small else 3)
    env = init_distributed("gloo")
    freq = load_frequencies(cfg.data.resolve(cfg.data.frequency_path), cfg.features)
    reader = make_reader(cfg, env, "train", freq)
    steps = min(steps, len(reader))
    torch.manual_seed(0)
    model = shard_model(build_model(cfg), env, cfg.features, cfg.training, cfg.data.batch_size)
    opt = dense_optimizer(model, cfg.training)
    params = list(opt.params.values())
    in_memory = list(itertools.islice(iter(reader), steps))
    for b in in_memory[:2]:
        train_micro_step(model, opt, params, b, cfg, env)

    def reader_only() -> None:
        for _ in itertools.islice(iter(reader), steps):
            pass

    def step_only() -> None:
        for b in in_memory:
            train_micro_step(model, opt, params, b, cfg, env)

    def sequential() -> None:
        for b in itertools.islice(iter(reader), steps):
            train_micro_step(model, opt, params, b, cfg, env)

    prefetcher = Prefetcher(reader, depth=depth)

    def prefetched() -> None:
        it = iter(prefetcher)
        for b in itertools.islice(it, steps):
            train_micro_step(model, opt, params, b, cfg, env)
        it.close()

    contenders = {
        "reader only": reader_only,
        "step only": step_only,
        "sequential": sequential,
        f"prefetch (depth {depth})": prefetched,
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    batch = cfg.data.batch_size
    results = []
    for name, ts in times.items():
        best = min(ts)
        results.append(
            {
                "name": name,
                "seconds": best,
                "seconds_median": statistics.median(ts),
                "ms_per_batch": 1e3 * best / steps,
                "samples_per_s": batch * steps / best,
            }
        )
        log(
            f"{name:<20} {results[-1]['ms_per_batch']:8.1f} ms/batch  {results[-1]['samples_per_s']:>10,.0f} samples/s"
        )
    by = {r["name"]: r["seconds"] for r in results}
    pre = by[f"prefetch (depth {depth})"]
    summary = {
        "speedup_over_sequential": by["sequential"] / pre,
        "ideal_seconds": max(by["reader only"], by["step only"]),
        "sequential_bound_seconds": by["reader only"] + by["step only"],
        "overlap_achieved": (by["sequential"] - pre) / max(min(by["reader only"], by["step only"]), 1e-9),
    }
    log(f"prefetch speed-up over sequential: x{summary['speedup_over_sequential']:.2f}")
    report = {
        "benchmark": "prefetch",
        "preset": "small" if small else "full",
        "machine": machine_info(),
        "settings": {
            "steps": steps,
            "rounds": rounds,
            "depth": depth,
            "batch": batch,
            "threads": torch.get_num_threads(),
            "data": str(data),
        },
        "results": results,
        "summary": summary,
    }
    (out / "prefetch.json").write_text(json.dumps(report, indent=2))
    plot_prefetch(report, out / "prefetch.png")
    return report
