"""Embedding lookup throughput: TorchRec's fused collections (through DistributedModelParallel), plain
``torch.nn.EmbeddingBag`` and FBGEMM's table-batched embedding op called directly, as a fraction of this
machine's measured memory bandwidth.

What is measured, per *point* (rows, dim, pooling factor, batch, dtype, tables):

* ``lookups_per_s``: rows read per second (``tables * batch * pooling`` per call);
* ``row_gbs``: bytes of those rows per second (``lookups * row_bytes``; ``row_bytes`` is the stored row:
  ``4 * dim`` fp32, ``2 * dim`` fp16, ``dim + 4`` int8 and ``dim / 2 + 4`` int4 with their fp16 scale and
  bias);
* ``fraction_of_bandwidth``: ``row_gbs`` over the STREAM copy bandwidth measured *in the same rounds*
  (:mod:`din_torchrec.bench.memory_bandwidth`).

Kernels (``mode`` ``fwd`` = forward only, ``train`` = forward + backward + SGD update of the touched rows):

* ``nn_embeddingbag``: ``torch.nn.EmbeddingBag(mode="sum")`` (``train``: sparse gradient + ``torch.optim.SGD``);
* ``fbgemm_tbe``: ``SplitTableBatchedEmbeddingBagsCodegen`` with ``EmbeddingLocation.HOST`` /
  ``ComputeDevice.CPU`` (``train``: its fused exact SGD inside the backward);
* ``fbgemm_intn``: ``IntNBitTableBatchedEmbeddingBagsCodegen`` (inference; int8 / int4 / fp16 rows);
* ``torchrec_ebc`` / ``torchrec_ec``: an ``EmbeddingBagCollection`` (pooled) / ``EmbeddingCollection``
  (per-position rows, what the sequence models use) sharded by ``DistributedModelParallel`` with a forced
  sharding type (``train``: fused SGD attached with ``apply_optimizer_in_backward``). World size 1 runs in
  this process; world size 2 spawns two gloo processes (one thread each) that each look up a local batch.
* ``torchrec_ebc_native`` / ``torchrec_ec_native``: the same collections with this project's TBE forward
  kernels (:mod:`din_torchrec.ops.tbe`, what the trainer runs on the CPU) in place of FBGEMM's; world size 1,
  when the native kernels build. Every other kernel runs with FBGEMM's (the registration is switched before
  each kernel's timed block, outside the timing).

Ids are uniform over the table (the worst case for caches: every lookup is a random row of DRAM). In each
point the contenders are built side by side and timed in interleaved rounds (kernel A, kernel B, ..., STREAM
copy, then again), so that a shared, noisy machine slows all of them alike; the best round counts (like
STREAM), the median is kept too. Points whose tables would not fit ``max_table_gb`` are skipped (listed in
the JSON); when the tables of all kernels do not fit together, the kernels run one after the other, each
with its own bandwidth rounds, and the result says ``interleaved: false``.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from din_torchrec.bench.memory_bandwidth import stream_copy
from din_torchrec.distributed.env import exits_without_finalization

FWD_KERNELS = (
    "nn_embeddingbag",
    "fbgemm_tbe",
    "torchrec_ebc",
    "torchrec_ebc_native",
    "torchrec_ec",
    "torchrec_ec_native",
)
TRAIN_KERNELS = ("nn_embeddingbag", "fbgemm_tbe", "torchrec_ebc", "torchrec_ebc_native")
NATIVE_SUFFIX = "_native"  # the TorchRec collection with the project's TBE kernels (ops/tbe.py)
INFERENCE_DTYPES = ("int8", "int4")
SHARDING_TYPES = ("table_wise", "row_wise", "column_wise", "data_parallel")


@dataclass
class Point:
    """One configuration of the sweep.

    ``sweep`` names the axis this point belongs to (for the chart); ``shardings`` the (sharding type, world
    size) pairs measured with the TorchRec kernels (world size 1 with ``table_wise`` by default).
    """

    rows: int
    dim: int
    pooling: int
    batch: int
    dtype: str = "fp32"
    tables: int = 1
    sweep: str = "base"
    modes: tuple[str, ...] = ("fwd",)
    shardings: tuple[tuple[str, int], ...] = (("table_wise", 1),)
    kernels: tuple[str, ...] = ()  # restrict to these kernels (empty: all that apply)

    def table_bytes(self) -> int:
        return self.tables * self.rows * row_bytes(self.dim, self.dtype)


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes of one stored row (int8/int4 rows carry an fp16 scale and bias: 4 bytes)."""
    return {"fp32": 4 * dim, "fp16": 2 * dim, "int8": dim + 4, "int4": dim // 2 + 4}[dtype]


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Inputs:
    """``variants`` batches of uniform ids, each ``tables * batch * pooling`` ids, table after table."""

    indices: list[torch.Tensor]
    offsets: torch.Tensor  # [tables * batch + 1], fixed pooling

    @property
    def lookups(self) -> int:
        return int(self.indices[0].numel())


def make_inputs(p: Point, variants: int = 3, seed: int = 0) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    n = p.tables * p.batch * p.pooling
    indices = [torch.randint(0, p.rows, (n,), generator=g) for _ in range(variants)]
    offsets = torch.arange(0, n + 1, p.pooling, dtype=torch.int64)
    return Inputs(indices, offsets)


# ----------------------------------------------------------------------------------------------------------
# Kernels: each is (row bytes of its table, a function running one call on input variant i)
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Kernel:
    name: str
    mode: str
    run: Callable[[int], None]
    table_bytes: int
    sharding: str = ""
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


def _torch_dtype(dtype: str) -> torch.dtype:
    return {"fp32": torch.float32, "fp16": torch.float16}[dtype]


def build_nn_embeddingbag(p: Point, inputs: Inputs, mode: str) -> Kernel:
    from torch import nn

    bags = [
        # sparse=True only when training: it slows the forward down by orders of magnitude for small batches.
        nn.EmbeddingBag(p.rows, p.dim, mode="sum", sparse=mode == "train", dtype=_torch_dtype(p.dtype))
        for _ in range(p.tables)
    ]
    per_table = p.batch * p.pooling
    offsets = inputs.offsets[: p.batch]
    opt = torch.optim.SGD([b.weight for b in bags], lr=0.01) if mode == "train" else None

    def run(i: int) -> None:
        ids = inputs.indices[i]
        if opt is None:
            with torch.no_grad():
                for t, bag in enumerate(bags):
                    bag(ids[t * per_table : (t + 1) * per_table], offsets)
            return
        outs = [bag(ids[t * per_table : (t + 1) * per_table], offsets) for t, bag in enumerate(bags)]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Kernel("nn_embeddingbag", mode, run, p.table_bytes())


def build_fbgemm_tbe(p: Point, inputs: Inputs, mode: str) -> Kernel:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(p.rows, p.dim, EmbeddingLocation.HOST, ComputeDevice.CPU)] * p.tables,
        weights_precision=SparseType.FP32 if p.dtype == "fp32" else SparseType.FP16,
        optimizer=EmbOptimType.EXACT_SGD,
        learning_rate=0.01,
    )

    def run(i: int) -> None:
        if mode == "fwd":
            with torch.no_grad():
                tbe(inputs.indices[i], inputs.offsets)
            return
        out = tbe(inputs.indices[i], inputs.offsets)
        out.backward(torch.ones_like(out))  # fused exact SGD on the touched rows

    return Kernel("fbgemm_tbe", mode, run, p.table_bytes(), extra={"module": tbe})


def build_fbgemm_intn(p: Point, inputs: Inputs, mode: str) -> Kernel:
    if mode != "fwd":
        raise ValueError("fbgemm_intn is an inference kernel: mode must be fwd")
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
        IntNBitTableBatchedEmbeddingBagsCodegen,
    )

    sparse = {"int8": SparseType.INT8, "int4": SparseType.INT4, "fp16": SparseType.FP16}[p.dtype]
    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        [(f"t{t}", p.rows, p.dim, sparse, EmbeddingLocation.HOST) for t in range(p.tables)],
        device="cpu",
        output_dtype=SparseType.FP32,
    )
    tbe.fill_random_weights()
    stored = int(tbe.weights_host.numel() * tbe.weights_host.element_size())
    ids32 = [x.int() for x in inputs.indices]
    off32 = inputs.offsets.int()

    def run(i: int) -> None:
        with torch.no_grad():
            tbe(ids32[i], off32)

    return Kernel(
        "fbgemm_intn", mode, run, stored, extra={"module": tbe, "row_bytes": stored / (p.rows * p.tables)}
    )


def _dmp_collection(p: Point, pooled: bool, sharding: str, mode: str) -> torch.nn.Module:
    """An EBC / EC of ``p.tables`` tables, sharded by DMP over the current process group with ``sharding``."""
    import torch.distributed as dist
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, EmbeddingCollection, EmbeddingConfig
    from torchrec.distributed.embedding import EmbeddingCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_configs import DataType
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from din_torchrec.distributed.sharding import RowWiseEmbeddingBagCollectionSharder

    data_type = DataType.FP32 if p.dtype == "fp32" else DataType.FP16
    # Fused tables allocate their own weights: build on meta so the unsharded module never holds a copy.
    # Data-parallel keeps the module's own parameters, so it needs real ones.
    device = torch.device("cpu") if sharding == "data_parallel" else torch.device("meta")
    if pooled:
        tables = [
            EmbeddingBagConfig(
                name=f"t{t}",
                embedding_dim=p.dim,
                num_embeddings=p.rows,
                feature_names=[f"f{t}"],
                data_type=data_type,
            )
            for t in range(p.tables)
        ]
        module: torch.nn.Module = EmbeddingBagCollection(tables=tables, device=device)
        sharder: Any = RowWiseEmbeddingBagCollectionSharder()
    else:
        tables = [
            EmbeddingConfig(
                name=f"t{t}",
                embedding_dim=p.dim,
                num_embeddings=p.rows,
                feature_names=[f"f{t}"],
                data_type=data_type,
            )
            for t in range(p.tables)
        ]
        module = EmbeddingCollection(tables=tables, device=device)
        sharder = EmbeddingCollectionSharder()
    if mode == "train":
        apply_optimizer_in_backward(torch.optim.SGD, module.parameters(), {"lr": 0.01})
    kernel = "dense" if sharding == "data_parallel" else "fused"
    constraints = {
        f"t{t}": ParameterConstraints(sharding_types=[sharding], compute_kernels=[kernel])
        for t in range(p.tables)
    }
    world = dist.get_world_size()
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, local_world_size=world, compute_device="cpu"),
        batch_size=p.batch,
        constraints=constraints,
    )
    plan = planner.plan(module, [sharder])
    return DistributedModelParallel(
        module=module,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=plan,
        sharders=[sharder],
    )


def build_torchrec(p: Point, inputs: Inputs, mode: str, pooled: bool, sharding: str = "table_wise") -> Kernel:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    if not pooled and sharding == "data_parallel":
        raise ValueError("EmbeddingCollection data_parallel is broken on CPU (see the notes); not measured")
    dmp = _dmp_collection(p, pooled, sharding, mode)
    keys = [f"f{t}" for t in range(p.tables)]
    lengths = torch.full((p.tables * p.batch,), p.pooling, dtype=torch.int64)
    kjts = [KeyedJaggedTensor.from_lengths_sync(keys, ids, lengths) for ids in inputs.indices]

    def run(i: int) -> None:
        if mode == "fwd":
            with torch.no_grad():
                out = dmp(kjts[i])
                if not pooled:
                    for jt in out.values():
                        jt.values()
            return
        out = dmp(kjts[i])
        values = out.values() if pooled else torch.cat([jt.values() for jt in out.values()])
        values.backward(torch.ones_like(values))

    name = "torchrec_ebc" if pooled else "torchrec_ec"
    return Kernel(name, mode, run, p.table_bytes(), sharding=sharding, extra={"module": dmp})


def build_kernel(name: str, p: Point, inputs: Inputs, mode: str, sharding: str = "table_wise") -> Kernel:
    if name == "nn_embeddingbag":
        return build_nn_embeddingbag(p, inputs, mode)
    if name == "fbgemm_tbe":
        return build_fbgemm_tbe(p, inputs, mode)
    if name == "fbgemm_intn":
        return build_fbgemm_intn(p, inputs, mode)
    if name in ("torchrec_ebc", "torchrec_ec"):
        return build_torchrec(p, inputs, mode, pooled=name == "torchrec_ebc", sharding=sharding)
    if name in ("torchrec_ebc_native", "torchrec_ec_native"):
        k = build_torchrec(p, inputs, mode, pooled=name == "torchrec_ebc_native", sharding=sharding)
        k.name = name
        k.extra["native_tbe"] = True
        return k
    raise ValueError(f"unknown kernel {name!r}")


def native_tbe_available() -> bool:
    from din_torchrec.ops import native

    return native.kernels() is not None


def use_tbe_kernels(k: Kernel) -> None:
    """FBGEMM's operators run this project's kernels for a ``*_native`` kernel, FBGEMM's own otherwise."""
    from din_torchrec.ops import tbe

    if k.extra.get("native_tbe"):
        assert tbe.install(), "the native kernels did not build"
    else:
        tbe.uninstall()


# ----------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------


def _time_calls(run: Callable[[int], None], iters: int, variants: int) -> float:
    """Seconds per call over ``iters`` calls cycling through the input variants."""
    t0 = time.perf_counter()
    for i in range(iters):
        run(i % variants)
    return (time.perf_counter() - t0) / iters


def _calibrate(run: Callable[[int], None], variants: int, target_s: float, max_iters: int) -> int:
    run(0)  # warm-up (first-call allocations, lazy init)
    once = _time_calls(run, 1, variants)
    return int(max(1, min(max_iters, target_s / max(once, 1e-6))))


class _Stream:
    """A STREAM copy that can be timed inside the rounds (arrays allocated once)."""

    def __init__(self, size_mb: float) -> None:
        n = max(1, int(size_mb * 2**20) // 8)
        self.a = torch.ones(n, dtype=torch.float64)
        self.b = torch.empty_like(self.a)
        self.b.copy_(self.a)

    def gbs(self, repeats: int = 3) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.b.copy_(self.a)
            best = min(best, time.perf_counter() - t0)
        return 2.0 * self.a.numel() * 8 / best / 1e9


def time_interleaved(
    kernels: list[Kernel],
    variants: int,
    rounds: int,
    target_s: float,
    max_iters: int,
    stream: _Stream | None,
) -> tuple[list[list[float]], list[float]]:
    """Per kernel the seconds per call of every round, and the STREAM GB/s of every round."""
    from din_torchrec.ops import tbe

    with tbe.registration_restored():
        iters = []
        for k in kernels:
            use_tbe_kernels(k)
            iters.append(_calibrate(k.run, variants, target_s, max_iters))
        times: list[list[float]] = [[] for _ in kernels]
        bandwidth: list[float] = []
        for _ in range(rounds):
            for j, k in enumerate(kernels):
                use_tbe_kernels(k)
                times[j].append(_time_calls(k.run, iters[j], variants))
            if stream is not None:
                bandwidth.append(stream.gbs())
    return times, bandwidth


def _result(p: Point, k: Kernel, times: list[float], lookups: int, bw: float, interleaved: bool) -> dict:
    best = min(times)
    med = statistics.median(times)
    rb = float(k.extra.get("row_bytes", row_bytes(p.dim, p.dtype)))
    lps = lookups / best
    out = {
        **{f: v for f, v in asdict(p).items() if f not in ("modes", "shardings", "kernels")},
        "kernel": k.name,
        "mode": k.mode,
        "sharding": k.sharding or None,
        "world_size": k.world_size,
        "lookups_per_call": lookups,
        "row_bytes": rb,
        "ms_per_call": best * 1e3,
        "ms_per_call_median": med * 1e3,
        "lookups_per_s": lps,
        "lookups_per_s_median": lookups / med,
        "row_gbs": lps * rb / 1e9,
        "bandwidth_gbs": bw,
        "interleaved": interleaved,
    }
    out["fraction_of_bandwidth"] = out["row_gbs"] / bw if bw > 0 else float("nan")
    return out


def kernel_specs(p: Point) -> list[tuple[str, str, str]]:
    """(kernel, mode, sharding) to measure at ``p`` in this process (world size 1)."""
    specs: list[tuple[str, str, str]] = []
    if p.dtype in INFERENCE_DTYPES:
        return [("fbgemm_intn", "fwd", "")]
    for mode in p.modes:
        names = FWD_KERNELS if mode == "fwd" else TRAIN_KERNELS
        for name in names:
            if name.endswith(NATIVE_SUFFIX) and not native_tbe_available():
                continue
            if name.startswith("torchrec"):
                for sharding, world in p.shardings:
                    if world != 1 or (name.startswith("torchrec_ec") and sharding == "data_parallel"):
                        continue
                    specs.append((name, mode, sharding))
            else:
                specs.append((name, mode, ""))
    if p.dtype == "fp16" and "fwd" in p.modes:
        specs.append(("fbgemm_intn", "fwd", ""))
    if p.kernels:
        specs = [s for s in specs if s[0] in p.kernels]
    return specs


def run_point(
    p: Point,
    rounds: int = 3,
    target_s: float = 0.3,
    max_iters: int = 200,
    stream_mb: float = 256.0,
    budget_bytes: int | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """All world-size-1 kernels of ``p``, interleaved when their tables fit ``budget_bytes`` together."""
    import gc

    variants = 3
    inputs = make_inputs(p, variants)
    specs = kernel_specs(p)
    per_kernel = p.table_bytes() * (2 if p.dtype == "fp16" else 1)  # fp32 staging of fp16 init
    together = budget_bytes is None or per_kernel * len(specs) <= budget_bytes
    groups = [specs] if together else [[s] for s in specs]
    stream = _Stream(stream_mb)
    results: list[dict[str, Any]] = []
    for group in groups:
        kernels = []
        for name, mode, sharding in group:
            t0 = time.perf_counter()
            kernels.append(build_kernel(name, p, inputs, mode, sharding or "table_wise"))
            log(
                f"  built {name}/{mode}{'/' + sharding if sharding else ''} in {time.perf_counter() - t0:.1f}s"
            )
        times, bw = time_interleaved(kernels, variants, rounds, target_s, max_iters, stream)
        best_bw = max(bw)
        for k, t in zip(kernels, times):
            results.append(_result(p, k, t, inputs.lookups, best_bw, together))
            r = results[-1]
            log(
                f"  {r['kernel']:<16} {r['mode']:<5} {r['sharding'] or '':<13} {r['lookups_per_s'] / 1e6:8.2f} M lookups/s "
                f"{r['row_gbs']:6.2f} GB/s = {100 * r['fraction_of_bandwidth']:5.1f}% of {best_bw:.1f} GB/s"
            )
        del kernels
        gc.collect()
    return results


# ----------------------------------------------------------------------------------------------------------
# World size 2: two gloo processes
# ----------------------------------------------------------------------------------------------------------


@exits_without_finalization
def _multiprocess_worker(rank: int, world: int, init_file: str, out_file: str, payload: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    spec = json.loads(payload)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        p = Point(**{k: v for k, v in spec["point"].items() if k not in ("modes", "shardings", "kernels")})
        inputs = make_inputs(p, variants=3, seed=1 + rank)
        results = []
        for name, mode, sharding in spec["specs"]:
            k = build_kernel(name, p, inputs, mode, sharding)
            k.world_size = world
            iters = _calibrate(k.run, 3, spec["target_s"], spec["max_iters"])
            t = torch.tensor([float(iters)])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # same number of (collective) calls on every rank
            iters = int(t.item())
            times = []
            for _ in range(spec["rounds"]):
                dist.barrier()
                s = torch.tensor([_time_calls(k.run, iters, 3)])
                dist.all_reduce(s, op=dist.ReduceOp.MAX)
                times.append(float(s.item()))
            # Every rank looked up its own local batch: the job's lookups per call are world x local.
            results.append((name, mode, sharding, times, inputs.lookups * world))
            del k
        if rank == 0:
            Path(out_file).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def run_multiprocess(
    p: Point,
    world: int = 2,
    rounds: int = 3,
    target_s: float = 0.3,
    max_iters: int = 200,
    bw_gbs: float = 0.0,
) -> list[dict[str, Any]]:
    """The TorchRec kernels of ``p`` for every sharding with world size ``world``, in ``world`` processes."""
    import torch.multiprocessing as mp

    specs = []
    for mode in p.modes:
        for name in ("torchrec_ebc", "torchrec_ec") if mode == "fwd" else ("torchrec_ebc",):
            if p.kernels and name not in p.kernels:
                continue
            for sharding, w in p.shardings:
                if w == world and not (name == "torchrec_ec" and sharding == "data_parallel"):
                    specs.append((name, mode, sharding))
    if not specs:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.json")
        payload = json.dumps(
            {
                "point": asdict(p),
                "specs": specs,
                "rounds": rounds,
                "target_s": target_s,
                "max_iters": max_iters,
            }
        )
        mp.spawn(_multiprocess_worker, args=(world, init_file, out_file, payload), nprocs=world, join=True)
        raw = json.loads(Path(out_file).read_text())
    results = []
    for name, mode, sharding, times, lookups in raw:
        k = Kernel(name, mode, lambda i: None, p.table_bytes(), sharding=sharding, world_size=world)
        results.append(_result(p, k, times, lookups, bw_gbs, interleaved=False))
    return results


# ----------------------------------------------------------------------------------------------------------
# Presets and the whole run
# ----------------------------------------------------------------------------------------------------------


def _axis_sweep(base: Point, axis: str, values: list[Any], **over: Any) -> list[Point]:
    out = []
    for v in values:
        q = copy.deepcopy(base)
        setattr(q, axis, v)
        for k, val in over.items():
            setattr(q, k, val)
        q.sweep = axis
        out.append(q)
    return out


def all_shardings(worlds: tuple[int, ...] = (1, 2)) -> tuple[tuple[str, int], ...]:
    return tuple((s, w) for w in worlds for s in SHARDING_TYPES)


def preset_points(preset: str) -> list[Point]:
    """``small`` (tiny tables, seconds; what the tests run) or ``full`` (the documented sweep: one axis at a
    time around rows 4M, dim 64, pooling 50, batch 4096, fp32; the rows axis at dim 16; sharding types x
    world size 1 and 2 on two 1M-row tables)."""
    if preset == "small":
        base = Point(rows=20_000, dim=16, pooling=4, batch=64, modes=("fwd", "train"))
        pts = [base]
        pts += _axis_sweep(
            base, "dtype", ["fp16", "int8", "int4"], modes=("fwd",), kernels=("fbgemm_tbe", "fbgemm_intn")
        )
        pts += _axis_sweep(
            base, "shardings", [(("row_wise", 2),)], modes=("fwd",), kernels=("torchrec_ebc",), tables=2
        )
        return pts
    if preset == "full":
        base = Point(rows=4_000_000, dim=64, pooling=50, batch=4096)
        pts = [copy.deepcopy(base)]
        pts[0].modes = ("fwd", "train")
        # rows at dim 16 (64-byte rows): 50M rows are 3.2 GB per copy of the table
        pts += _axis_sweep(base, "rows", [1_000_000, 4_000_000, 10_000_000, 50_000_000], dim=16)
        pts += _axis_sweep(base, "dim", [16, 32, 128])
        pts += _axis_sweep(base, "pooling", [1, 10, 200])
        pts += _axis_sweep(base, "batch", [512, 16384])
        pts += _axis_sweep(base, "dtype", ["fp16", "int8", "int4"])
        pts += _axis_sweep(
            base, "shardings", [all_shardings((1, 2))], rows=1_000_000, tables=2, modes=("fwd", "train")
        )
        return pts
    raise ValueError(f"embeddings preset: expected small or full, got {preset!r}")


def grid_points(
    rows: list[int],
    dims: list[int],
    poolings: list[int],
    batches: list[int],
    dtypes: list[str],
    modes: list[str],
) -> list[Point]:
    """The full product of the given axes (``--rows 1e6,5e7 --dims 16,128 ...``)."""
    return [
        Point(rows=r, dim=d, pooling=pf, batch=b, dtype=dt, sweep="grid", modes=tuple(modes))
        for r, d, pf, b, dt in itertools.product(rows, dims, poolings, batches, dtypes)
    ]


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def run_embeddings(
    points: list[Point],
    out_dir: str | Path,
    rounds: int = 3,
    target_s: float = 0.3,
    max_iters: int = 200,
    stream_mb: float = 256.0,
    max_table_gb: float | None = None,
    multiprocess: bool = True,
    preset: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every point, write ``embeddings.json`` and ``embeddings.png`` into ``out_dir``; return the JSON."""
    from din_torchrec.bench.plots import plot_embeddings
    from din_torchrec.distributed.env import init_distributed
    from din_torchrec.utils.allocator import tune_malloc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    budget = int(max_table_gb * 1e9) if max_table_gb else int(0.5 * _available_bytes())
    tune_malloc()  # as training runs (training.malloc_tuning): output buffers are reused, not re-faulted
    init_distributed("gloo")
    t_start = time.perf_counter()
    bandwidth = stream_copy(size_mb=max(stream_mb, 1.0), repeats=rounds + 2)
    log(f"memory bandwidth (STREAM copy): {bandwidth['best_gbs']:.1f} GB/s")
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for p in points:
        label = f"rows={p.rows:,} dim={p.dim} pooling={p.pooling} batch={p.batch} {p.dtype} tables={p.tables}"
        if p.table_bytes() > budget:
            skipped.append(
                {
                    **asdict(p),
                    "reason": f"tables {p.table_bytes() / 1e9:.1f} GB > budget {budget / 1e9:.1f} GB",
                }
            )
            log(f"[{p.sweep}] {label}: skipped ({skipped[-1]['reason']})")
            continue
        log(f"[{p.sweep}] {label}")
        point_results = run_point(p, rounds, target_s, max_iters, stream_mb, budget, log)
        results += point_results
        if multiprocess and any(w == 2 for _, w in p.shardings):
            bw = max((r["bandwidth_gbs"] for r in point_results), default=bandwidth["best_gbs"])
            for r in run_multiprocess(p, 2, rounds, target_s, max_iters, bw):
                results.append(r)
                log(
                    f"  {r['kernel']:<16} {r['mode']:<5} {r['sharding']:<13} ws=2 "
                    f"{r['lookups_per_s'] / 1e6:8.2f} M lookups/s {r['row_gbs']:6.2f} GB/s = "
                    f"{100 * r['fraction_of_bandwidth']:5.1f}%"
                )
    report = {
        "benchmark": "embeddings",
        "preset": preset,
        "machine": machine_info(),
        "memory_bandwidth": bandwidth,
        "settings": {
            "rounds": rounds,
            "target_seconds_per_round": target_s,
            "stream_mb": stream_mb,
            "budget_gb": budget / 1e9,
            "ids": "uniform over the table",
        },
        "results": results,
        "skipped": skipped,
        "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "embeddings.json").write_text(json.dumps(report, indent=2))
    plot_embeddings(report, out / "embeddings.png")
    return report


def machine_info() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    info["numpy"] = np.__version__
    return info
