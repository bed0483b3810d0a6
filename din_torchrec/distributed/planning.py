"""Offline sharding plans: a topology YAML and an experiment config in, a TorchRec plan and a report out.

``din-torchrec plan`` (see :mod:`din_torchrec.distributed.plan_cli`) builds the model on the meta device (no
table is allocated, so a 2-billion-row table plans on a laptop), attaches the sparse optimizer so that its
state is counted, and asks TorchRec's ``EmbeddingShardingPlanner`` for a plan on the declared topology. The
result is

* a report: per table the sharding type, kernel, shards and ranks; per rank the HBM and host DRAM used
  against capacity; the planner's per-rank cost estimates;
* a JSON plan file that :func:`load_plan` turns back into a ``torchrec.distributed.types.ShardingPlan`` for
  ``DistributedModelParallel`` (``training.plan_path``).

A model that does not fit raises :class:`PlanDoesNotFit`, whose message names the table and the rank that
overflow and lists the per-table size estimates.

The topology file (``configs/topologies/*.yaml``) is parsed strictly into :class:`TopologyConfig`; sizes are
GiB (2**30 bytes) and bandwidths GiB/s, per device (rank).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    ShardingOption,
    Stats,
    Storage,
    Topology,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import (
    CacheParams,
    EmbeddingModuleShardingPlan,
    EnumerableShardingSpec,
    ParameterSharding,
    ShardingPlan,
    ShardingType,
    ShardMetadata,
)
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from din_torchrec.config import (
    ConfigError,
    ExperimentConfig,
    FeaturesConfig,
    from_dict,
    parse_overrides,
    to_dict,
)
from din_torchrec.distributed.sharding import attach_sparse_optimizer, default_sharders, planner_constraints
from din_torchrec.utils.io import atomic_write_json

GiB = 1024**3
PLAN_FORMAT = "din_torchrec.sharding_plan"
PLAN_VERSION = 1

_SHARDING_TYPES = [t.value for t in ShardingType]
_KERNELS = [k.value for k in EmbeddingComputeKernel]
_CUDA_ONLY_KERNELS = {
    EmbeddingComputeKernel.FUSED_UVM.value,
    EmbeddingComputeKernel.FUSED_UVM_CACHING.value,
    EmbeddingComputeKernel.QUANT_UVM.value,
    EmbeddingComputeKernel.QUANT_UVM_CACHING.value,
    EmbeddingComputeKernel.KEY_VALUE.value,
}


# --------------------------------------------------------------------------------------------------------
# The topology file
# --------------------------------------------------------------------------------------------------------


@dataclass
class TablePlanningConfig:
    """Planning-time constraints for one table (they replace ``training.sharding.<table>`` when set).

    ``cache_load_factor``: the share of a ``fused_uvm_caching`` table's rows cached in HBM (the rest lives in
    host DRAM); ``min_partition``: the narrowest column-wise shard (a multiple of 4).
    """

    sharding_types: list[str] = field(default_factory=list)
    compute_kernels: list[str] = field(default_factory=list)
    cache_load_factor: float | None = None
    min_partition: int | None = None


@dataclass
class PlanningConfig:
    """How the planner sees the workload.

    ``batch_size``: samples per rank per step (default ``data.batch_size``); ``mean_history_length``: the
    average number of behaviours per sample, the history features' pooling factor (default
    ``data.max_history``, an upper bound); ``reserved_hbm_fraction``: the planner's safety margin of HBM
    per GPU on top of the dense part and the input batches.
    """

    batch_size: int | None = None
    mean_history_length: float | None = None
    reserved_hbm_fraction: float = 0.15
    timeout_seconds: int | None = None
    tables: dict[str, TablePlanningConfig] = field(default_factory=dict)


@dataclass
class TopologyConfig:
    """The cluster a plan is made for. Capacities are per device (rank); sizes GiB, bandwidths GiB/s.

    ``devices_per_host``: GPUs per host (on CPU: ranks per host). ``hbm_gib`` is ignored for
    ``compute_device: cpu``. Memory bandwidths left null take TorchRec's defaults.
    """

    world_size: int
    devices_per_host: int
    compute_device: Literal["cuda", "cpu"] = "cuda"
    hbm_gib: float = 80.0
    ddr_gib: float = 128.0
    intra_host_gib_per_s: float = 600.0
    inter_host_gib_per_s: float = 12.5
    hbm_gib_per_s: float | None = None
    ddr_gib_per_s: float | None = None
    hbm_to_ddr_gib_per_s: float | None = None
    name: str = ""
    planning: PlanningConfig = field(default_factory=PlanningConfig)

    @property
    def num_hosts(self) -> int:
        return self.world_size // self.devices_per_host

    def validate(self) -> TopologyConfig:
        if self.world_size <= 0:
            raise ConfigError(f"world_size: expected a positive integer, got {self.world_size}")
        if self.devices_per_host <= 0 or self.world_size % self.devices_per_host:
            raise ConfigError(
                f"devices_per_host: expected a positive divisor of world_size {self.world_size}, "
                f"got {self.devices_per_host}"
            )
        if self.compute_device == "cuda" and self.hbm_gib <= 0:
            raise ConfigError(f"hbm_gib: expected > 0 for compute_device cuda, got {self.hbm_gib}")
        if self.ddr_gib <= 0:
            raise ConfigError(f"ddr_gib: expected > 0, got {self.ddr_gib}")
        for key in ("intra_host_gib_per_s", "inter_host_gib_per_s", "hbm_gib_per_s", "ddr_gib_per_s"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key}: expected > 0, got {value}")
        p = self.planning
        if p.batch_size is not None and p.batch_size <= 0:
            raise ConfigError(f"planning.batch_size: expected a positive integer, got {p.batch_size}")
        if p.mean_history_length is not None and p.mean_history_length <= 0:
            raise ConfigError(f"planning.mean_history_length: expected > 0, got {p.mean_history_length}")
        if not 0.0 <= p.reserved_hbm_fraction < 1.0:
            raise ConfigError(
                f"planning.reserved_hbm_fraction: expected in [0, 1), got {p.reserved_hbm_fraction}"
            )
        for name, t in p.tables.items():
            where = f"planning.tables.{name}"
            for i, s in enumerate(t.sharding_types):
                if s not in _SHARDING_TYPES:
                    raise ConfigError(
                        f"{where}.sharding_types[{i}]: expected one of {_SHARDING_TYPES}, got {s!r}"
                    )
            for i, k in enumerate(t.compute_kernels):
                if k not in _KERNELS:
                    raise ConfigError(f"{where}.compute_kernels[{i}]: expected one of {_KERNELS}, got {k!r}")
                if self.compute_device == "cpu" and k in _CUDA_ONLY_KERNELS:
                    raise ConfigError(
                        f"{where}.compute_kernels[{i}]: {k!r} needs GPUs (UVM / key-value kernels exist for "
                        "compute_device cuda only)"
                    )
            if t.cache_load_factor is not None and not 0.0 < t.cache_load_factor <= 1.0:
                raise ConfigError(f"{where}.cache_load_factor: expected in (0, 1], got {t.cache_load_factor}")
            if t.min_partition is not None and (t.min_partition <= 0 or t.min_partition % 4):
                raise ConfigError(
                    f"{where}.min_partition: expected a positive multiple of 4, got {t.min_partition}"
                )
        return self


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: cannot set a key below {p!r}, which holds {nxt!r}")
        node = nxt
    node[parts[-1]] = value


def load_topology(path: str | Path, overrides: list[str] | None = None) -> TopologyConfig:
    """Read a topology YAML strictly (unknown keys and wrong types name the key path) and apply
    ``key.path=value`` overrides."""
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read topology file ({e.strerror})") from e
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from e
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level, got {type(tree).__name__}")
    for key, value in parse_overrides(overrides):
        _set_path(tree, key, value)
    try:
        topo = from_dict(TopologyConfig, tree).validate()
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e
    if not topo.name:
        topo.name = p.stem
    return topo


def build_topology(topo: TopologyConfig) -> Topology:
    """TorchRec's ``Topology`` for the declared cluster (through ``TopologyFactory``)."""
    hardware = HardwareConfig(
        intra_host_bw=topo.intra_host_gib_per_s * GiB / 1000,  # TorchRec counts bytes per millisecond
        inter_host_bw=topo.inter_host_gib_per_s * GiB / 1000,
        hbm_mem_bw=topo.hbm_gib_per_s * GiB / 1000 if topo.hbm_gib_per_s else None,
        ddr_mem_bw=topo.ddr_gib_per_s * GiB / 1000 if topo.ddr_gib_per_s else None,
        hbm_to_ddr_mem_bw=topo.hbm_to_ddr_gib_per_s * GiB / 1000 if topo.hbm_to_ddr_gib_per_s else None,
    )
    trainer = TrainerConfig(
        world_size=topo.world_size,
        local_world_size=topo.devices_per_host,
        hbm_cap_bytes=int(topo.hbm_gib * GiB) if topo.compute_device == "cuda" else 0,
        ddr_cap_bytes=int(topo.ddr_gib * GiB),
    )
    kernel = KernelConfig(compute_device=topo.compute_device, use_hardware_based_bandwidth=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TopologyFactory.create_topology(trainer, hardware_config=hardware, kernel_config=kernel)


# --------------------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------------------


class PlanDoesNotFit(RuntimeError):
    """No sharding plan fits the topology; the message says which table overflows which rank, and why."""

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


class PlanFileError(ConfigError):
    """A saved plan cannot be used: unreadable, not a plan, or made for another job."""


@dataclass
class PlanResult:
    """A plan and everything the report needs."""

    plan: ShardingPlan
    report: dict[str, Any]
    topology: TopologyConfig

    @property
    def seconds(self) -> float:
        return float(self.report["planning_seconds"])


class _CaptureStats(Stats):
    """Keeps what the planner logs: the chosen sharding options (or, after a failure, the last proposal)."""

    def __init__(self) -> None:
        self.best_plan: list[ShardingOption] = []
        self.num_proposals = 0
        self.num_plans = 0

    def log(
        self,
        sharding_plan: Any,
        topology: Any,
        batch_size: Any,
        storage_reservation: Any,
        num_proposals: int,
        num_plans: int,
        run_time: float,
        best_plan: list[ShardingOption],
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.best_plan = list(best_plan)
        self.num_proposals = num_proposals
        self.num_plans = num_plans


@dataclass
class _Table:
    name: str
    module: str
    kind: str  # "sequence" (EmbeddingCollection) or "profile" (EmbeddingBagCollection)
    num_embeddings: int
    embedding_dim: int
    features: list[str]


def _tables(model: nn.Module) -> dict[str, _Table]:
    out: dict[str, _Table] = {}
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingCollection):
            configs, kind = module.embedding_configs(), "sequence"
        elif isinstance(module, EmbeddingBagCollection):
            configs, kind = module.embedding_bag_configs(), "profile"
        else:
            continue
        for c in configs:
            out[c.name] = _Table(c.name, path, kind, c.num_embeddings, c.embedding_dim, list(c.feature_names))
    return out


def _pooling_factors(table: _Table, features: FeaturesConfig, history_length: float) -> list[float]:
    """Average ids per sample of each feature of ``table``: 1 for candidates and profile ids, the mean
    history length for behaviour sequences (and DIEN's negative behaviours)."""
    targets = {t.target_column for t in features.sequence} | {p.column for p in features.profile}
    return [1.0 if f in targets else float(history_length) for f in table.features]


def planning_constraints(
    cfg: ExperimentConfig, topo: TopologyConfig, tables: dict[str, _Table]
) -> dict[str, ParameterConstraints]:
    """``training.sharding`` (with the CPU restrictions of :func:`sharding.planner_constraints`), then the
    topology's ``planning.tables`` on top, plus per-feature pooling factors."""
    unknown = sorted(
        set(topo.planning.tables)
        - {t.name for t in cfg.features.sequence}
        - {p.name for p in cfg.features.profile}
    )
    if unknown:
        raise ConfigError(f"planning.tables.{unknown[0]}: no such table in the model config")
    base = planner_constraints(
        cfg.features,
        cfg.training.sharding,
        topo.compute_device,
        topo.world_size,
        cfg.training.embedding_bounds_check,
    )
    history = topo.planning.mean_history_length or float(cfg.data.max_history)
    out: dict[str, ParameterConstraints] = {}
    for name, table in tables.items():
        c = copy.deepcopy(base.get(name, ParameterConstraints()))
        t = topo.planning.tables.get(name)
        if t is not None:
            if t.sharding_types:
                c.sharding_types = list(t.sharding_types)
            if t.compute_kernels:
                c.compute_kernels = list(t.compute_kernels)
            if t.cache_load_factor is not None:
                c.cache_params = CacheParams(load_factor=t.cache_load_factor)
            if t.min_partition is not None:
                c.min_partition = t.min_partition
        c.pooling_factors = _pooling_factors(table, cfg.features, history)
        c.feature_names = list(table.features)
        for i, s in enumerate(c.sharding_types or []):
            if s not in _SHARDING_TYPES:
                raise ConfigError(
                    f"training.sharding.{name}.sharding_types[{i}]: expected one of {_SHARDING_TYPES}, got {s!r}"
                )
        for i, k in enumerate(c.compute_kernels or []):
            if k not in _KERNELS:
                raise ConfigError(
                    f"training.sharding.{name}.compute_kernels[{i}]: expected one of {_KERNELS}, got {k!r}"
                )
        if (
            topo.compute_device == "cpu"
            and table.kind == "sequence"
            and ShardingType.DATA_PARALLEL.value in (c.sharding_types or [])
        ):
            raise ConfigError(
                f"{name}: data_parallel for a sequence (EmbeddingCollection) table is broken on CPU (FBGEMM's "
                "dense CPU kernel pools the per-position rows); choose table_wise, row_wise or column_wise"
            )
        out[name] = c
    return out


def _dense_bytes(model: nn.Module, multiplier: float = 6.0) -> int:
    """TorchRec's heuristic for the replicated dense part: parameters x 6 (weights, optimizer state, DDP
    buckets) + buffers; embedding tables excluded."""
    tables = [m for m in model.modules() if isinstance(m, (EmbeddingCollection, EmbeddingBagCollection))]
    skip = {id(t) for m in tables for t in list(m.parameters()) + list(m.buffers())}
    total = sum(multiplier * p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)
    total += sum(b.numel() * b.element_size() for b in model.buffers() if id(b) not in skip)
    return int(total)


def build_meta_model(cfg: ExperimentConfig) -> nn.Module:
    """The model with its tables on the meta device and the fused sparse optimizer attached (its state is
    what the planner counts on top of the weights)."""
    from din_torchrec.models import build_model

    model = build_model(cfg, device=torch.device("meta"))
    attach_sparse_optimizer(model, cfg.training)
    return model


def _quiet_data_parallel_spec(record: logging.LogRecord) -> bool:
    """Drop the planner's root-logger warning for every data-parallel table (they have no shard spec by
    design)."""
    return not str(record.msg).startswith("Sharding spec not found for")


def plan_for_topology(cfg: ExperimentConfig, topo: TopologyConfig) -> PlanResult:
    """Plan ``cfg``'s model for ``topo`` without allocating a table.

    Raises :class:`PlanDoesNotFit` (message naming the table and rank that overflow) when no plan fits.
    """
    t0 = time.perf_counter()
    model = build_meta_model(cfg)
    tables = _tables(model)
    topology = build_topology(topo)
    constraints = planning_constraints(cfg, topo, tables)
    batch_size = topo.planning.batch_size or cfg.data.batch_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HeuristicalStorageReservation's FutureWarning
        reservation = HeuristicalStorageReservation(
            percentage=topo.planning.reserved_hbm_fraction, dense_tensor_estimate=_dense_bytes(model) or None
        )
    stats = _CaptureStats()
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints,
        storage_reservation=reservation,
        stats=[stats],
        debug=False,
        timeout_seconds=topo.planning.timeout_seconds,
    )
    sharders = default_sharders()
    build_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    root = logging.getLogger()
    root.addFilter(_quiet_data_parallel_spec)
    try:
        plan = planner.plan(model, sharders)
    except PlannerError as e:
        seconds = time.perf_counter() - t1
        message, report = _explain_failure(
            e, cfg, topo, topology, model, tables, constraints, batch_size, reservation, sharders
        )
        report["planning_seconds"] = seconds
        raise PlanDoesNotFit(message, report) from e
    finally:
        root.removeFilter(_quiet_data_parallel_spec)
    seconds = time.perf_counter() - t1
    report = _report(cfg, topo, topology, tables, stats, reservation, batch_size)
    report["planning_seconds"] = seconds
    report["build_seconds"] = build_seconds
    return PlanResult(plan=plan, report=report, topology=topo)


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------

_PERF_KEYS = ("fwd_compute", "fwd_comms", "bwd_compute", "bwd_comms", "input_dist_comms", "prefetch_compute")


def _reserved(topology: Topology, reservation: HeuristicalStorageReservation) -> Storage:
    """Per-rank storage the planner keeps for the dense part, input batches and the HBM margin."""
    reserved = reservation.last_reserved_topology
    cap = topology.devices[0].storage
    if reserved is not None:
        free = reserved.devices[0].storage
        return Storage(hbm=cap.hbm - free.hbm, ddr=cap.ddr - free.ddr, ssd=0)
    dense = reservation._dense_storage or Storage(0, 0, 0)
    kjt = reservation._kjt_storage or Storage(0, 0, 0)
    margin = int(cap.hbm * reservation._percentage)
    return Storage(hbm=dense.hbm + kjt.hbm + margin, ddr=dense.ddr + kjt.ddr, ssd=0)


def _reservation_parts(topology: Topology, reservation: HeuristicalStorageReservation) -> dict[str, Any]:
    dense = reservation._dense_storage or Storage(0, 0, 0)
    kjt = reservation._kjt_storage or Storage(0, 0, 0)
    return {
        "dense_bytes": int(dense.hbm + dense.ddr),
        "input_batches_bytes": int(kjt.hbm + kjt.ddr),
        "hbm_margin_bytes": int(topology.devices[0].storage.hbm * reservation._percentage),
        "hbm_margin_fraction": reservation._percentage,
    }


def _perf_dict(perfs: list[Any]) -> dict[str, float]:
    out = {k: float(sum(getattr(p, k, 0.0) for p in perfs)) for k in _PERF_KEYS}
    out["total"] = float(sum(p.total for p in perfs))
    return out


def _report(
    cfg: ExperimentConfig,
    topo: TopologyConfig,
    topology: Topology,
    tables: dict[str, _Table],
    stats: _CaptureStats,
    reservation: HeuristicalStorageReservation,
    batch_size: int,
) -> dict[str, Any]:
    reserved = _reserved(topology, reservation)
    world = topo.world_size
    per_rank_tables: list[list[str]] = [[] for _ in range(world)]
    used_hbm = [0] * world
    used_ddr = [0] * world
    perf: list[list[Any]] = [[] for _ in range(world)]
    table_rows = []
    order = {name: i for i, name in enumerate(tables)}
    for so in sorted(stats.best_plan, key=lambda s: order.get(s.name, 0)):
        t = tables[so.name]
        ranks = [int(s.rank) for s in so.shards if s.rank is not None]
        for s in so.shards:
            r = int(s.rank)  # type: ignore[arg-type]
            used_hbm[r] += s.storage.hbm
            used_ddr[r] += s.storage.ddr
            perf[r].append(s.perf)
            if so.name not in per_rank_tables[r]:
                per_rank_tables[r].append(so.name)
        hbm = sum(s.storage.hbm for s in so.shards)
        ddr = sum(s.storage.ddr for s in so.shards)
        table_rows.append(
            {
                "table": so.name,
                "module": so.path,
                "kind": t.kind,
                "num_embeddings": t.num_embeddings,
                "embedding_dim": t.embedding_dim,
                "sharding_type": so.sharding_type,
                "compute_kernel": so.compute_kernel,
                "cache_load_factor": so.cache_params.load_factor if so.cache_params else None,
                "num_shards": len(so.shards),
                "ranks": ranks,
                "shard_sizes": [list(s.size) for s in so.shards[:1]]
                + (
                    [list(so.shards[-1].size)]
                    if len(so.shards) > 1 and so.shards[-1].size != so.shards[0].size
                    else []
                ),
                "hbm_bytes": int(hbm),
                "ddr_bytes": int(ddr),
                "max_shard_hbm_bytes": int(max(s.storage.hbm for s in so.shards)),
                "max_shard_ddr_bytes": int(max(s.storage.ddr for s in so.shards)),
                "perf_ms": _perf_dict([s.perf for s in so.shards]),
                "max_shard_perf_ms": float(max(s.perf.total for s in so.shards)),
            }
        )
    cap = topology.devices[0].storage
    rank_rows = []
    for r in range(world):
        p = _perf_dict(perf[r])
        rank_rows.append(
            {
                "rank": r,
                "host": r // topo.devices_per_host,
                "tables": per_rank_tables[r],
                "hbm_tables_bytes": int(used_hbm[r]),
                "hbm_reserved_bytes": int(reserved.hbm),
                "hbm_used_bytes": int(used_hbm[r] + reserved.hbm),
                "hbm_capacity_bytes": int(topology.devices[r].storage.hbm),
                "ddr_tables_bytes": int(used_ddr[r]),
                "ddr_reserved_bytes": int(reserved.ddr),
                "ddr_used_bytes": int(used_ddr[r] + reserved.ddr),
                "ddr_capacity_bytes": int(topology.devices[r].storage.ddr),
                "perf_ms": p,
            }
        )
    totals = [row["perf_ms"]["total"] for row in rank_rows]
    mean = sum(totals) / max(len(totals), 1)
    return {
        "fits": True,
        "model": cfg.model.name,
        "topology": to_dict(topo),
        "world_size": world,
        "devices_per_host": topo.devices_per_host,
        "compute_device": topo.compute_device,
        "batch_size_per_rank": batch_size,
        "num_proposals": stats.num_proposals,
        "num_plans": stats.num_plans,
        "reserved_per_rank": {
            "hbm_bytes": int(reserved.hbm),
            "ddr_bytes": int(reserved.ddr),
            **_reservation_parts(topology, reservation),
        },  # fmt: skip
        "capacity_per_rank": {"hbm_bytes": int(cap.hbm), "ddr_bytes": int(cap.ddr)},
        "tables": table_rows,
        "ranks": rank_rows,
        "perf": {
            "max_rank_ms": max(totals) if totals else 0.0,
            "mean_rank_ms": mean,
            "imbalance": (max(totals) / mean) if mean > 0 else 1.0,
            "critical_rank": int(max(range(world), key=lambda r: totals[r])) if totals else 0,
        },
        "max_hbm_used_bytes": max((r["hbm_used_bytes"] for r in rank_rows), default=0),
        "max_ddr_used_bytes": max((r["ddr_used_bytes"] for r in rank_rows), default=0),
    }


def human_bytes(n: float) -> str:
    """``8.13 GiB``, ``266.0 KiB``."""
    n = float(n)
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def ranks_text(ranks: list[int]) -> str:
    """``[0, 1, 2, 3, 8]`` -> ``0-3,8``."""
    if not ranks:
        return "-"
    rs = sorted(set(ranks))
    parts = []
    start = prev = rs[0]
    for r in rs[1:] + [None]:  # type: ignore[list-item]
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def _pct(used: float, cap: float) -> str:
    return f"{100.0 * used / cap:5.1f}%" if cap > 0 else "    -"


def _memory_cell(used: int, capacity: int) -> str:
    return f"{human_bytes(used):>10} / {human_bytes(capacity):>10} {_pct(used, capacity)}"


def format_report(report: dict[str, Any]) -> str:
    """The report as text: tables, ranks (memory against capacity, estimated cost), totals.

    Consecutive ranks whose line would read the same are printed once, as a range."""
    t = report["topology"]
    gpu = report["compute_device"] != "cpu"
    cap = report["capacity_per_rank"]
    memory = (
        f"{human_bytes(cap['hbm_bytes'])} HBM + {human_bytes(cap['ddr_bytes'])} host DRAM per rank"
        if gpu
        else f"{human_bytes(cap['ddr_bytes'])} DRAM per rank"
    )
    lines = [
        f"Sharding plan for {report['model']} on {t.get('name') or 'topology'}: {report['world_size']} ranks "
        f"({report['devices_per_host']} per host), compute device {report['compute_device']}, {memory}, "
        f"batch {report['batch_size_per_rank']} per rank",
        f"planned in {report['planning_seconds']:.2f} s ({report['num_proposals']} proposals, "
        f"{report['num_plans']} feasible)",
        "",
        "Tables (memory: weights + optimizer state, all shards; shard ms: the slowest shard's estimated cost)",
        f"  {'table':<12} {'rows x dim':>22}  {'sharding':<16} {'kernel':<30} {'shards':>6}  {'ranks':<12} "
        + (f"{'HBM total':>11} " if gpu else "")
        + f"{'DRAM total':>11}  {'shard ms':>8}",
    ]
    for row in report["tables"]:
        kernel = row["compute_kernel"]
        if row.get("cache_load_factor"):
            kernel += f" (cache {row['cache_load_factor']:g})"
        lines.append(
            f"  {row['table']:<12} {row['num_embeddings']:>14,} x {row['embedding_dim']:<5}  "
            f"{row['sharding_type']:<16} {kernel:<30} {row['num_shards']:>6}  {ranks_text(row['ranks']):<12} "
            + (f"{human_bytes(row['hbm_bytes']):>11} " if gpu else "")
            + f"{human_bytes(row['ddr_bytes']):>11}  {row['max_shard_perf_ms']:>8.3f}"
        )
    res = report["reserved_per_rank"]
    reserved_for = (
        "the dense part, input batches and the HBM margin" if gpu else "the dense part and input batches"
    )
    lines += [
        "",
        f"Ranks (tables + reserved for {reserved_for}, against capacity; consecutive ranks alike on one line)",
        f"  {'ranks':>9} {'hosts':>5}  "
        + (f"{'HBM used / capacity':>28}  " if gpu else "")
        + f"{'DRAM used / capacity':>29}  {'cost ms':>8}  tables",
    ]
    rendered: list[tuple[list[int], list[int], str]] = []
    for r in report["ranks"]:
        body = (
            (_memory_cell(r["hbm_used_bytes"], r["hbm_capacity_bytes"]) + "  " if gpu else "")
            + _memory_cell(r["ddr_used_bytes"], r["ddr_capacity_bytes"])
            + f"  {r['perf_ms']['total']:>8.3f}  {','.join(r['tables'])}"
        )
        if rendered and rendered[-1][2] == body and rendered[-1][0][-1] + 1 == r["rank"]:
            rendered[-1][0].append(r["rank"])
            rendered[-1][1].append(r["host"])
        else:
            rendered.append(([r["rank"]], [r["host"]], body))
    for ranks, hosts, body in rendered:
        lines.append(f"  {ranks_text(ranks):>9} {ranks_text(hosts):>5}  {body}")
    perf = report["perf"]
    if gpu:
        reserved = (
            f"reserved per rank: {human_bytes(res['hbm_bytes'])} HBM, {human_bytes(res['ddr_bytes'])} DRAM "
            f"(dense part {human_bytes(res['dense_bytes'])}, input batches "
            f"{human_bytes(res['input_batches_bytes'])}, HBM margin {100 * res['hbm_margin_fraction']:.0f}%)"
        )
        most = f"{human_bytes(report['max_hbm_used_bytes'])} HBM, {human_bytes(report['max_ddr_used_bytes'])} DRAM"
    else:
        reserved = (
            f"reserved per rank: {human_bytes(res['ddr_bytes'])} (dense part {human_bytes(res['dense_bytes'])}, "
            f"input batches {human_bytes(res['input_batches_bytes'])})"
        )
        most = f"{human_bytes(report['max_ddr_used_bytes'])} DRAM"
    lines += [
        "",
        reserved,
        f"most used rank: {most}",
        f"planner cost estimate per step (fwd+bwd compute and comms, ms): slowest rank {perf['critical_rank']} "
        f"{perf['max_rank_ms']:.3f}, mean {perf['mean_rank_ms']:.3f}, imbalance x{perf['imbalance']:.2f}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# Explaining a plan that does not fit
# --------------------------------------------------------------------------------------------------------


def _pressure(so: ShardingOption, free_hbm: float, free_ddr: float) -> float:
    worst = 0.0
    for s in so.shards:
        for need, free in ((s.storage.hbm, free_hbm), (s.storage.ddr, free_ddr)):
            if need > 0:
                worst = max(worst, need / free if free > 0 else math.inf)
    return worst


def _explain_failure(
    error: PlannerError,
    cfg: ExperimentConfig,
    topo: TopologyConfig,
    topology: Topology,
    model: nn.Module,
    tables: dict[str, _Table],
    constraints: dict[str, ParameterConstraints],
    batch_size: int,
    reservation: HeuristicalStorageReservation,
    sharders: list[Any],
) -> tuple[str, dict[str, Any]]:
    """Words for a failed plan: each table's smallest option, a greedy placement of the largest first, and
    the first table that finds no rank with room (naming that rank and the numbers)."""
    world = topo.world_size
    cap = topology.devices[0].storage
    reserved = _reserved(topology, reservation)
    free_hbm = [max(0, topology.devices[r].storage.hbm - reserved.hbm) for r in range(world)]
    free_ddr = [max(0, topology.devices[r].storage.ddr - reserved.ddr) for r in range(world)]
    holders: list[list[str]] = [[] for _ in range(world)]
    if topo.compute_device == "cuda":
        memory = f"{human_bytes(cap.hbm)} HBM + {human_bytes(cap.ddr)} host DRAM per rank"
        kept = f"{human_bytes(reserved.hbm)} HBM and {human_bytes(reserved.ddr)} DRAM"
    else:
        memory = f"{human_bytes(cap.ddr)} DRAM per rank"
        kept = f"{human_bytes(reserved.ddr)}"
    header = (
        f"No sharding plan fits topology {topo.name or '?'}: {world} ranks ({topo.devices_per_host} per host), "
        f"{topo.compute_device}, {memory}; {kept} of each rank are reserved for the dense part, input batches "
        "and the HBM margin."
    )
    if reserved.hbm > cap.hbm or reserved.ddr > cap.ddr:
        header += " The reservation alone exceeds a rank's memory (lower planning.batch_size or reserved_hbm_fraction)."
    enumerator = EmbeddingEnumerator(topology=topology, batch_size=batch_size, constraints=constraints)
    try:
        search_space = enumerator.enumerate(model, sharders)
    except Exception:  # noqa: BLE001 - the planner already failed; explain with what we have
        search_space = []
    options: dict[str, list[ShardingOption]] = {}
    for so in search_space:
        options.setdefault(so.name, []).append(so)
    cap_hbm0, cap_ddr0 = free_hbm[0], free_ddr[0]
    smallest: dict[str, ShardingOption] = {}
    for name, opts in options.items():
        smallest[name] = min(
            opts,
            key=lambda so: (
                _pressure(so, cap_hbm0, cap_ddr0),
                sum(s.storage.hbm + s.storage.ddr for s in so.shards),
            ),
        )
    table_rows = []
    for name, t in tables.items():
        so = smallest.get(name)
        row: dict[str, Any] = {
            "table": name,
            "kind": t.kind,
            "num_embeddings": t.num_embeddings,
            "embedding_dim": t.embedding_dim,
        }
        if so is not None:
            row.update(
                {
                    "total_bytes": int(sum(s.storage.hbm + s.storage.ddr for s in so.shards)),
                    "smallest_option": {
                        "sharding_type": so.sharding_type,
                        "compute_kernel": so.compute_kernel,
                        "num_shards": len(so.shards),
                        "max_shard_hbm_bytes": int(max(s.storage.hbm for s in so.shards)),
                        "max_shard_ddr_bytes": int(max(s.storage.ddr for s in so.shards)),
                    },
                    "allowed_sharding_types": sorted({o.sharding_type for o in options[name]}),
                    "allowed_compute_kernels": sorted({o.compute_kernel for o in options[name]}),
                }
            )
        table_rows.append(row)

    overflow: dict[str, Any] | None = None
    order = sorted(
        smallest.values(),
        key=lambda so: -max(max(s.storage.hbm, s.storage.ddr) for s in so.shards),
    )
    for so in order:
        stype = so.sharding_type
        shards = sorted(so.shards, key=lambda s: -(s.storage.hbm + s.storage.ddr))
        if stype in (ShardingType.ROW_WISE.value, ShardingType.DATA_PARALLEL.value) and len(shards) == world:
            candidates_per_shard: list[list[int]] = [list(range(world))] * len(shards)
        elif stype == ShardingType.TABLE_ROW_WISE.value:
            host = max(
                range(topo.num_hosts),
                key=lambda h: min(
                    free_hbm[r] + free_ddr[r]
                    for r in range(h * topo.devices_per_host, (h + 1) * topo.devices_per_host)
                ),
            )
            hr = list(range(host * topo.devices_per_host, (host + 1) * topo.devices_per_host))
            candidates_per_shard = [hr] * len(shards)
        else:
            candidates_per_shard = [list(range(world))] * len(shards)
        used: set[int] = set()
        for shard, candidates in zip(shards, candidates_per_shard):
            pool = [r for r in candidates if r not in used] or list(candidates)
            rank = max(pool, key=lambda r: (free_hbm[r] - shard.storage.hbm if shard.storage.hbm else 0,
                                            free_ddr[r] - shard.storage.ddr, -r))  # fmt: skip
            if shard.storage.hbm <= free_hbm[rank] and shard.storage.ddr <= free_ddr[rank]:
                free_hbm[rank] -= shard.storage.hbm
                free_ddr[rank] -= shard.storage.ddr
                holders[rank].append(so.name)
                used.add(rank)
                continue
            memory = "HBM" if shard.storage.hbm > free_hbm[rank] else "host DRAM"
            need = shard.storage.hbm if memory == "HBM" else shard.storage.ddr
            free = free_hbm[rank] if memory == "HBM" else free_ddr[rank]
            capacity = cap.hbm if memory == "HBM" else cap.ddr
            overflow = {
                "table": so.name,
                "rank": rank,
                "memory": "hbm" if memory == "HBM" else "ddr",
                "sharding_type": stype,
                "compute_kernel": so.compute_kernel,
                "num_shards": len(so.shards),
                "shard_rows": int(shard.size[0]),
                "shard_cols": int(shard.size[1]),
                "need_bytes": int(need),
                "free_bytes": int(free),
                "capacity_bytes": int(capacity),
                "already_on_rank": sorted(set(holders[rank])),
            }
            break
        if overflow is not None:
            break

    lines = [header]
    if overflow is not None:
        o = overflow
        memory = "HBM" if o["memory"] == "hbm" else "host DRAM"
        others = (
            f"already placed there: {', '.join(o['already_on_rank'])}"
            if o["already_on_rank"]
            else "no other table placed there"
        )
        lines.append(
            f"Table '{o['table']}' overflows rank {o['rank']}: even its smallest option ({o['sharding_type']}, "
            f"kernel {o['compute_kernel']}, {o['num_shards']} shard(s)) puts a shard of "
            f"{o['shard_rows']:,} rows x {o['shard_cols']} (weights + optimizer state) needing "
            f"{human_bytes(o['need_bytes'])} of {memory} on rank {o['rank']}, which has "
            f"{human_bytes(o['free_bytes'])} of its {human_bytes(o['capacity_bytes'])} free ({others})."
        )
    else:
        lines.append(
            "Each table's smallest option fits on its own; the planner found no placement of all of them "
            f"together within the allowed sharding types and kernels. TorchRec said: {error}"
        )
    lines.append("Per-table estimates (weights + optimizer state; smallest option allowed for the table):")
    for row in table_rows:
        opt = row.get("smallest_option")
        if opt is None:
            lines.append(
                f"  {row['table']:<12} {row['num_embeddings']:>14,} x {row['embedding_dim']:<4} (no option)"
            )
            continue
        per_shard = []
        if opt["max_shard_hbm_bytes"]:
            per_shard.append(f"{human_bytes(opt['max_shard_hbm_bytes'])} HBM")
        if opt["max_shard_ddr_bytes"]:
            per_shard.append(f"{human_bytes(opt['max_shard_ddr_bytes'])} DRAM")
        lines.append(
            f"  {row['table']:<12} {row['num_embeddings']:>14,} x {row['embedding_dim']:<4} "
            f"{human_bytes(row['total_bytes']):>11} in all; {opt['sharding_type']}/{opt['compute_kernel']} "
            f"over {opt['num_shards']} shard(s): {' + '.join(per_shard) or '0 B'} per shard"
        )
    hints = ["more ranks (world_size)", "devices with more memory (hbm_gib / ddr_gib)"]
    if topo.compute_device == "cuda":
        hints.insert(
            0,
            "let the big tables use fused_uvm_caching (planning.tables.<table>.compute_kernels and "
            "cache_load_factor in the topology file) so that only a cache of their rows lives in HBM",
        )
    hints.append("fewer or smaller tables (features.*.num_embeddings, features.embedding_dim)")
    lines.append("Ways out: " + "; ".join(hints) + ".")
    report = {
        "fits": False,
        "model": cfg.model.name,
        "topology": to_dict(topo),
        "world_size": world,
        "compute_device": topo.compute_device,
        "batch_size_per_rank": batch_size,
        "capacity_per_rank": {"hbm_bytes": int(cap.hbm), "ddr_bytes": int(cap.ddr)},
        "reserved_per_rank": {
            "hbm_bytes": int(reserved.hbm),
            "ddr_bytes": int(reserved.ddr),
            **_reservation_parts(topology, reservation),
        },  # fmt: skip
        "overflow": overflow,
        "tables": table_rows,
        "planner_error": str(error),
        "message": "\n".join(lines),
    }
    return "\n".join(lines), report


# --------------------------------------------------------------------------------------------------------
# Saving and loading plans
# --------------------------------------------------------------------------------------------------------


def _enum_name(value: Any) -> Any:
    return None if value is None else value.name


def _cache_params_to_dict(cp: CacheParams | None) -> dict[str, Any] | None:
    if cp is None:
        return None
    return {
        "algorithm": _enum_name(cp.algorithm),
        "load_factor": cp.load_factor,
        "reserved_memory": cp.reserved_memory,
        "precision": _enum_name(cp.precision),
        "prefetch_pipeline": cp.prefetch_pipeline,
    }


def plan_to_dict(
    plan: ShardingPlan,
    world_size: int,
    local_world_size: int,
    compute_device: str,
    tables: dict[str, dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A JSON-ready form of ``plan`` that :func:`plan_from_dict` reads back exactly."""
    modules: dict[str, Any] = {}
    for module_path, module_plan in plan.plan.items():
        entries: dict[str, Any] = {}
        for table, ps in module_plan.items():  # type: ignore[attr-defined]
            if ps.key_value_params is not None:
                raise ValueError(
                    f"{module_path}.{table}: key-value (SSD) tables cannot be saved by this tool"
                )
            shards = None
            if isinstance(ps.sharding_spec, EnumerableShardingSpec):
                shards = [
                    {
                        "offsets": list(s.shard_offsets),
                        "sizes": list(s.shard_sizes),
                        "placement": str(s.placement),
                    }
                    for s in ps.sharding_spec.shards
                ]
            entries[table] = {
                "sharding_type": ps.sharding_type,
                "compute_kernel": ps.compute_kernel,
                "ranks": list(ps.ranks) if ps.ranks is not None else None,
                "shards": shards,
                "cache_params": _cache_params_to_dict(ps.cache_params),
                "enforce_hbm": ps.enforce_hbm,
                "stochastic_rounding": ps.stochastic_rounding,
                "bounds_check_mode": _enum_name(ps.bounds_check_mode),
                "output_dtype": _enum_name(ps.output_dtype),
            }
        modules[module_path] = entries
    out: dict[str, Any] = {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "world_size": world_size,
        "local_world_size": local_world_size,
        "compute_device": compute_device,
        "tables": tables or {},
        "plan": modules,
    }
    if extra:
        out.update(extra)
    return out


def save_plan(path: str | Path, result: PlanResult) -> Path:
    """Write ``result``'s plan as JSON (atomically), with the table shapes and a summary of the report."""
    topo = result.topology
    tables = {
        row["table"]: {
            "module": row["module"],
            "num_embeddings": row["num_embeddings"],
            "embedding_dim": row["embedding_dim"],
        }
        for row in result.report["tables"]
    }
    summary = {
        "created_by": "din-torchrec plan",
        "topology": to_dict(topo),
        "summary": {
            "planning_seconds": result.report["planning_seconds"],
            "max_hbm_used_bytes": result.report["max_hbm_used_bytes"],
            "max_ddr_used_bytes": result.report["max_ddr_used_bytes"],
            "max_rank_cost_ms": result.report["perf"]["max_rank_ms"],
        },
    }
    data = plan_to_dict(
        result.plan, topo.world_size, topo.devices_per_host, topo.compute_device, tables, summary
    )
    return atomic_write_json(path, data)


_ENTRY_KEYS = {
    "sharding_type",
    "compute_kernel",
    "ranks",
    "shards",
    "cache_params",
    "enforce_hbm",
    "stochastic_rounding",
    "bounds_check_mode",
    "output_dtype",
}


def _enum_value(enum_cls: Any, name: Any, where: str) -> Any:
    if name is None:
        return None
    try:
        return enum_cls[name]
    except KeyError as e:
        raise PlanFileError(f"{where}: expected one of {[m.name for m in enum_cls]}, got {name!r}") from e


def plan_from_dict(data: dict[str, Any], where: str = "plan") -> ShardingPlan:
    """The ``ShardingPlan`` of a dict written by :func:`plan_to_dict` (strict: unknown keys are errors)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, CacheAlgorithm
    from torchrec.types import DataType

    modules = data.get("plan")
    if not isinstance(modules, dict):
        raise PlanFileError(f"{where}: no 'plan' mapping")
    plan: dict[str, Any] = {}
    for module_path, entries in modules.items():
        if not isinstance(entries, dict):
            raise PlanFileError(f"{where}: plan.{module_path}: expected a mapping of tables")
        module_plan = EmbeddingModuleShardingPlan()
        for table, e in entries.items():
            w = f"{where}: plan.{module_path}.{table}"
            if not isinstance(e, dict):
                raise PlanFileError(f"{w}: expected a mapping")
            unknown = sorted(set(e) - _ENTRY_KEYS)
            if unknown:
                raise PlanFileError(f"{w}.{unknown[0]}: unknown key; entries accept {sorted(_ENTRY_KEYS)}")
            for key in ("sharding_type", "compute_kernel"):
                if not isinstance(e.get(key), str):
                    raise PlanFileError(f"{w}.{key}: required string missing")
            if e["sharding_type"] not in _SHARDING_TYPES:
                raise PlanFileError(
                    f"{w}.sharding_type: expected one of {_SHARDING_TYPES}, got {e['sharding_type']!r}"
                )
            if e["compute_kernel"] not in _KERNELS:
                raise PlanFileError(
                    f"{w}.compute_kernel: expected one of {_KERNELS}, got {e['compute_kernel']!r}"
                )
            spec = None
            if e.get("shards") is not None:
                spec = EnumerableShardingSpec(
                    [
                        ShardMetadata(
                            shard_offsets=list(s["offsets"]),
                            shard_sizes=list(s["sizes"]),
                            placement=s["placement"],
                        )
                        for s in e["shards"]
                    ]
                )
            cp = e.get("cache_params")
            cache_params = None
            if cp is not None:
                cache_params = CacheParams(
                    algorithm=_enum_value(CacheAlgorithm, cp.get("algorithm"), f"{w}.cache_params.algorithm"),
                    load_factor=cp.get("load_factor"),
                    reserved_memory=cp.get("reserved_memory"),
                    precision=_enum_value(DataType, cp.get("precision"), f"{w}.cache_params.precision"),
                    prefetch_pipeline=cp.get("prefetch_pipeline"),
                )
            module_plan[table] = ParameterSharding(
                sharding_type=e["sharding_type"],
                compute_kernel=e["compute_kernel"],
                ranks=list(e["ranks"]) if e.get("ranks") is not None else None,
                sharding_spec=spec,
                cache_params=cache_params,
                enforce_hbm=e.get("enforce_hbm"),
                stochastic_rounding=e.get("stochastic_rounding"),
                bounds_check_mode=_enum_value(
                    BoundsCheckMode, e.get("bounds_check_mode"), f"{w}.bounds_check_mode"
                ),
                output_dtype=_enum_value(DataType, e.get("output_dtype"), f"{w}.output_dtype"),
            )
        plan[module_path] = module_plan
    return ShardingPlan(plan)


def _check_tables(data: dict[str, Any], features: FeaturesConfig, where: str) -> None:
    expected: dict[str, tuple[int, int]] = {
        t.name: (t.num_embeddings, features.embedding_dim) for t in features.sequence
    }
    expected.update(
        {p.name: (p.num_embeddings, p.embedding_dim or features.embedding_dim) for p in features.profile}
    )
    planned: dict[str, tuple[int, int]] = {}
    for entries in data["plan"].values():
        for table, e in entries.items():
            shape = data.get("tables", {}).get(table)
            if shape:
                planned[table] = (int(shape["num_embeddings"]), int(shape["embedding_dim"]))
            elif e.get("shards"):
                rows = max(s["offsets"][0] + s["sizes"][0] for s in e["shards"])
                cols = max(s["offsets"][1] + s["sizes"][1] for s in e["shards"])
                planned[table] = (rows, cols)
            else:
                planned[table] = expected.get(table, (-1, -1))
    missing = sorted(set(expected) - set(planned))
    extra = sorted(set(planned) - set(expected))
    if missing or extra:
        raise PlanFileError(
            f"{where}: the plan's tables do not match the model's"
            + (f"; not in the plan: {missing}" if missing else "")
            + (f"; not in the model: {extra}" if extra else "")
            + " (plan again with this config)"
        )
    for table, shape in planned.items():
        if shape != expected[table]:
            raise PlanFileError(
                f"{where}: table {table!r} was planned as {shape[0]:,} x {shape[1]} but the model has "
                f"{expected[table][0]:,} x {expected[table][1]} (plan again with this config)"
            )


def load_plan(
    path: str | Path,
    world_size: int,
    features: FeaturesConfig | None = None,
    compute_device: str | None = None,
) -> ShardingPlan:
    """The ``ShardingPlan`` saved by ``din-torchrec plan``, for a job of ``world_size`` ranks.

    Raises :class:`PlanFileError` (a ``ConfigError``) when the file is unreadable or not such a plan, when it
    was made for another world size, for another ``compute_device`` (``"cpu"``/``"cuda"``, the job's
    ``env.device.type``; when None, only a CUDA plan on a machine without CUDA is refused), or (with
    ``features``) when its tables differ from the model's.
    """
    p = Path(path)
    where = f"training.plan_path {p}"
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise PlanFileError(f"{where}: cannot read the plan ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise PlanFileError(f"{where}: not JSON ({e})") from e
    if isinstance(data, list):
        raise PlanFileError(
            f"{where}: this is the plan summary a training run writes (a list of tables), not a saved plan; "
            "make one with `din-torchrec plan --config ... --topology ... --out plan.json`"
        )
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise PlanFileError(f"{where}: not a plan written by `din-torchrec plan` (no format {PLAN_FORMAT!r})")
    if data.get("version") != PLAN_VERSION:
        raise PlanFileError(
            f"{where}: plan format version {data.get('version')!r}, this code reads {PLAN_VERSION}"
        )
    planned = data.get("world_size")
    if planned != world_size:
        raise PlanFileError(
            f"{where}: the plan was made for {planned} ranks but this job has {world_size}; plan again with a "
            f"topology of world_size {world_size} (or launch {planned} ranks)"
        )
    planned_device = data.get("compute_device")
    if compute_device is not None and planned_device != compute_device:
        raise PlanFileError(
            f"{where}: the plan was made for compute device {planned_device!r} but this job runs on "
            f"{compute_device!r}; plan again with a topology of compute_device {compute_device}"
        )
    if compute_device is None and planned_device == "cuda" and not torch.cuda.is_available():
        raise PlanFileError(
            f"{where}: the plan was made for compute device 'cuda' but this machine has no GPU; plan again "
            "with a topology of compute_device cpu"
        )
    plan = plan_from_dict(data, where)
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[attr-defined]
            bad = [r for r in (ps.ranks or []) if not 0 <= r < world_size]
            if bad:
                raise PlanFileError(
                    f"{where}: plan.{module_path}.{table} places shards on ranks {bad}, outside 0..{world_size - 1}"
                )
    if features is not None:
        _check_tables(data, features, where)
    return plan
