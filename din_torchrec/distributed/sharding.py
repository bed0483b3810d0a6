"""Sharding a model: fused sparse optimizers, planner constraints, the plan and DistributedModelParallel."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan, ShardingType
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from din_torchrec.config import FeaturesConfig, TableShardingConfig, TrainingConfig
from din_torchrec.distributed.env import DistEnv

SPARSE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}

# EmbeddingCollection data-parallel is broken on CPU (FBGEMM's dense CPU kernel pools rows that should stay
# per-position), so on CPU the planner never gets to choose it.
_CPU_EC_SHARDING_TYPES = [
    ShardingType.TABLE_WISE.value,
    ShardingType.ROW_WISE.value,
    ShardingType.COLUMN_WISE.value,
]


class RowWiseEmbeddingBagCollectionSharder(EmbeddingBagCollectionSharder):
    """EmbeddingBagCollection sharder that also offers row-wise sharding on CPU (TorchRec lists it only for
    CUDA, but it runs and matches the unsharded result on CPU)."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = list(super().sharding_types(compute_device_type))
        if ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


def attach_sparse_optimizer(model: nn.Module, training: TrainingConfig) -> None:
    """Attach the fused sparse optimizer to every embedding table (applied in backward).

    Under DistributedModelParallel the sharded tables turn this into FBGEMM's fused kernel (the update happens
    inside the lookup's backward, without materialising a dense gradient); unsharded it runs per parameter
    in backward. Must be called before sharding, on the unsharded model.
    """
    cls = SPARSE_OPTIMIZERS[training.sparse_optimizer]
    kwargs: dict[str, Any] = {"lr": training.lr_sparse}
    params = []
    for name, module in model.named_modules():
        if type(module).__name__ in ("EmbeddingCollection", "EmbeddingBagCollection"):
            params.extend(module.parameters())
        del name
    if params:
        apply_optimizer_in_backward(cls, params, kwargs)


def planner_constraints(
    features: FeaturesConfig,
    sharding: dict[str, TableShardingConfig],
    compute_device: str,
    world_size: int = 0,
    bounds_check: str | None = None,
) -> dict[str, ParameterConstraints]:
    """Per-table constraints from ``training.sharding`` plus the CPU restrictions.

    With ``world_size == 1`` a table the config leaves open is placed table-wise: one rank holds every table
    whole anyway, and the planner's estimates tie there, so it may pick row-wise, which only adds
    bucketize / permute / output-gather work to each step (3-5 % of a DIN step here, measured
    side by side). ``world_size=0`` (unknown, e.g. planning for other hardware) adds no such constraint.
    """
    single = world_size == 1
    constraints: dict[str, ParameterConstraints] = {}
    for t in features.sequence:
        c = sharding.get(t.name)
        types = list(c.sharding_types) if c and c.sharding_types else None
        if types is None and single:
            types = [ShardingType.TABLE_WISE.value]
        elif types is None and compute_device == "cpu":
            types = list(_CPU_EC_SHARDING_TYPES)
        kernels = list(c.compute_kernels) if c and c.compute_kernels else None
        constraints[t.name] = ParameterConstraints(sharding_types=types, compute_kernels=kernels)
    for p in features.profile:
        c = sharding.get(p.name)
        if c is not None:
            constraints[p.name] = ParameterConstraints(
                sharding_types=list(c.sharding_types) or None, compute_kernels=list(c.compute_kernels) or None
            )
        if single and (c is None or not c.sharding_types):
            base = constraints.get(p.name, ParameterConstraints())
            base.sharding_types = [ShardingType.TABLE_WISE.value]
            constraints[p.name] = base
    if bounds_check is not None:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

        mode = BoundsCheckMode[bounds_check.upper()]
        for name in [t.name for t in features.sequence] + [p.name for p in features.profile]:
            constraints.setdefault(name, ParameterConstraints()).bounds_check_mode = mode
    return constraints


def default_sharders() -> list[ModuleSharder[nn.Module]]:
    """Sharders for the two collection types every model holds."""
    return [EmbeddingCollectionSharder(), RowWiseEmbeddingBagCollectionSharder()]  # type: ignore[list-item]


def make_plan(
    model: nn.Module,
    env: DistEnv,
    features: FeaturesConfig,
    sharding: dict[str, TableShardingConfig],
    batch_size: int,
    sharders: list[ModuleSharder[nn.Module]] | None = None,
    bounds_check: str | None = None,
) -> ShardingPlan:
    """Plan with TorchRec's EmbeddingShardingPlanner for the current job's topology.

    ``plan`` (not ``collective_plan``) runs on every rank: the planner is deterministic, and a failure then
    raises on every rank instead of leaving the others waiting in a broadcast.
    """
    compute_device = env.device.type
    topology = Topology(
        world_size=env.world_size, local_world_size=env.local_world_size, compute_device=compute_device
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=planner_constraints(features, sharding, compute_device, env.world_size, bounds_check),
        debug=False,
    )
    return planner.plan(model, sharders or default_sharders())


def shard_model(
    model: nn.Module,
    env: DistEnv,
    features: FeaturesConfig,
    training: TrainingConfig,
    batch_size: int,
    plan: ShardingPlan | None = None,
) -> DistributedModelParallel:
    """Attach the sparse optimizer, plan (unless given a plan) and wrap in DistributedModelParallel.

    The dense part is replicated (DistributedDataParallel inside DMP) when there is more than one rank; tables
    are sharded by the plan. A one-rank job gets no DDP wrapper: with nothing to average, its reducer would
    only copy every dense gradient into buckets and back around a one-process all-reduce (0.46 ms of a 47 ms
    DIEN bf16 step here, paired per batch). The state dict is the same either way (DMP drops DDP's ``module.`` prefix), so
    checkpoints move between world sizes as before.
    """
    attach_sparse_optimizer(model, training)
    sharders = default_sharders()
    if plan is None:
        plan = make_plan(
            model, env, features, training.sharding, batch_size, sharders, training.embedding_bounds_check
        )
    # References (no copy) to the unsharded initial weights: sharded tables placed on other ranks are
    # re-initialised by their kernels, so the shards are filled from these afterwards. Every rank built the
    # model from the same seed, hence the same initial weights.
    initial = model.state_dict()
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=env.device,
        plan=plan,
        sharders=sharders,
        init_data_parallel=env.world_size > 1,
    )
    load_unsharded_state(dmp, initial)
    return dmp


@torch.no_grad()
def load_unsharded_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors into a sharded model: each rank fills its local shards from the slice of
    the full tensor that the shard metadata names; replicated tensors are copied whole."""
    for name, target in model.state_dict().items():
        if name not in state:
            raise KeyError(f"unsharded state has no entry {name!r}")
        full = state[name]
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                index = tuple(
                    slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.tensor.shape)
                )
                shard.tensor.copy_(full[index])
        elif isinstance(target, DTensor):
            local = target.to_local()
            for shard, offsets in zip(local.local_shards(), local.local_offsets()):  # type: ignore[attr-defined]
                index = tuple(slice(o, o + n) for o, n in zip(offsets, shard.shape))
                shard.copy_(full[index])
        elif isinstance(target, torch.Tensor):
            target.copy_(full)


def _is_table(name: str) -> bool:
    return ".embedding_bags." in name or ".embeddings." in name


def dense_optimizer(model: nn.Module, training: TrainingConfig) -> KeyedOptimizer:
    """Optimizer for every parameter not updated by a fused (in-backward) optimizer.

    MLP/attention/recurrent weights get ``training.dense_optimizer`` at ``lr_dense``. Tables the plan made
    data-parallel are ordinary replicated parameters after sharding (no fused kernel): they get the sparse
    optimizer's class and ``lr_sparse``, so a table trains the same whichever sharding the planner picks.
    """
    named = dict(in_backward_optimizer_filter(model.named_parameters()))
    dense = {k: v for k, v in named.items() if not _is_table(k)}
    tables = {k: v for k, v in named.items() if _is_table(k)}
    lr = training.lr_dense
    if training.dense_optimizer == "adam":

        def factory(p: Any) -> torch.optim.Optimizer:
            # fused: one kernel for all parameters (CPU and CUDA); 2 % of a bf16 DIN step here over foreach.
            return torch.optim.Adam(p, lr=lr, fused=True)
    elif training.dense_optimizer == "adagrad":

        def factory(p: Any) -> torch.optim.Optimizer:
            return torch.optim.Adagrad(p, lr=lr)
    else:

        def factory(p: Any) -> torch.optim.Optimizer:
            return torch.optim.SGD(p, lr=lr)

    optimizers: list[tuple[str, KeyedOptimizer]] = [("dense", KeyedOptimizerWrapper(dense, factory))]
    if tables:
        sparse_cls = SPARSE_OPTIMIZERS[training.sparse_optimizer]
        lr_sparse = training.lr_sparse
        optimizers.append(
            ("data_parallel_tables", KeyedOptimizerWrapper(tables, lambda p: sparse_cls(p, lr=lr_sparse)))
        )
    return CombinedOptimizer(optimizers)


def clipped_parameters(model: nn.Module) -> list[torch.Tensor]:
    """The parameters gradient clipping applies to: the dense network, not tables (fused tables never hold
    a gradient; data-parallel tables are treated like them)."""
    return [p for n, p in in_backward_optimizer_filter(model.named_parameters()) if not _is_table(n)]


def combined_optimizer(model: DistributedModelParallel, dense: KeyedOptimizer) -> CombinedOptimizer:
    """Fused sparse + dense optimizers as one keyed optimizer (one state dict for checkpoints)."""
    return CombinedOptimizer([("sparse", model.fused_optimizer), ("dense", dense)])


def describe_plan(plan: ShardingPlan) -> list[dict[str, Any]]:
    """Per table: module path, sharding type, kernel and the ranks holding it (for logs and JSON)."""
    rows = []
    for module_path, module_plan in plan.plan.items():
        for table, ps in module_plan.items():  # type: ignore[union-attr]
            rows.append(
                {
                    "module": module_path,
                    "table": table,
                    "sharding_type": ps.sharding_type,
                    "compute_kernel": ps.compute_kernel,
                    "ranks": list(ps.ranks or []),
                }
            )
    return rows
