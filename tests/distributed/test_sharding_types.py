"""Every sharding type the CPU offers gives the unsharded model: forward and one optimizer step, 2 gloo ranks.

EmbeddingCollection (the sequence tables): table-wise, row-wise, column-wise. EmbeddingBagCollection (the
profile tables): table-wise, column-wise, data-parallel, and row-wise through the sharder that adds it on
CPU. Each case pairs one EC type with one EBC type and runs ``_worker`` of test_sharded_equivalence (2 ranks
under DistributedModelParallel against 1 unsharded process with plain SGD, regularizer included).

The placements are explicit (TorchRec's ``construct_module_sharding_plan``: table-wise tables on different
ranks in table order, column-wise halves on ranks 0 and 1 — the planner itself may put both halves on one rank) and travel
through a saved plan file (:func:`plan_to_dict` -> JSON -> :func:`load_plan`), so every sharding type also
round-trips the plan format. Column-wise needs a dim that splits: the tables here are 256 wide.

Data-parallel tables use TorchRec's dense kernel: their weights are ordinary replicated parameters. They
must still train like the fused tables (the sparse optimizer class at ``lr_sparse``, no clipping): the
data-parallel case with ``lr_dense != lr_sparse`` checks that.

The profile tables' pooled outputs come out of a sharded EmbeddingBagCollection grouped by rank: with the
first profile table on rank 1 and the second on rank 0, reading the KeyedTensor by position would hand the
top MLP permuted inputs; the reversed-ranks case checks the model reads it by key.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingPlan

from din_torchrec.config import ExperimentConfig
from din_torchrec.distributed import sharding
from din_torchrec.distributed.env import DistEnv, exits_without_finalization
from din_torchrec.distributed.planning import load_plan, plan_to_dict
from din_torchrec.distributed.sharding import attach_sparse_optimizer, default_sharders, make_plan
from din_torchrec.models import build_model
from din_torchrec.utils.io import atomic_write_json
from tests.distributed import test_sharded_equivalence as eq

DIM = 256
CASES = [
    # (EmbeddingCollection sharding, EmbeddingBagCollection sharding)
    ("table_wise", "column_wise"),
    ("row_wise", "data_parallel"),
    ("column_wise", "table_wise"),
    ("table_wise", "row_wise"),
]

_original_small_config = eq.small_config
_original_shard_model = sharding.shard_model


def wide_config(
    model: str, ec_sharding: str, ebc_sharding: str = "table_wise", same_lr: bool = False
) -> ExperimentConfig:
    """``small_config`` with tables wide enough for column-wise sharding to split them (and, with
    ``same_lr``, one learning rate for tables and dense parameters)."""
    cfg = _original_small_config(model, ec_sharding, ebc_sharding)
    cfg.features.embedding_dim = DIM
    if same_lr:
        cfg.training.lr_dense = cfg.training.lr_sparse
    return cfg.validate()


def _generator(kind: str, table_index: int):
    if kind == "table_wise":
        return table_wise(rank=table_index % eq.WORLD, compute_kernel="fused")
    if kind == "row_wise":
        return row_wise(compute_kernel="fused")
    if kind == "column_wise":
        return column_wise(ranks=list(range(eq.WORLD)), compute_kernel="fused")
    if kind == "data_parallel":
        return data_parallel()
    raise ValueError(kind)


def explicit_plan(
    cfg: ExperimentConfig, ec_sharding: str, ebc_sharding: str, profile_rank_offset: int = 0
) -> ShardingPlan:
    """The plan placing every sequence table with ``ec_sharding`` and every profile table with
    ``ebc_sharding``, table-wise tables alternating between the ranks (the first profile table on rank
    ``profile_rank_offset``)."""
    model = build_model(cfg, device=torch.device("meta"))
    ec_sharder, ebc_sharder = default_sharders()
    seq = construct_module_sharding_plan(
        model.sequence_embeddings,
        {t.name: _generator(ec_sharding, i) for i, t in enumerate(cfg.features.sequence)},
        sharder=ec_sharder,
        local_size=eq.WORLD,
        world_size=eq.WORLD,
        device_type="cpu",
    )
    prof = construct_module_sharding_plan(
        model.profile_embeddings,
        {
            p.name: _generator(ebc_sharding, i + profile_rank_offset)
            for i, p in enumerate(cfg.features.profile)
        },
        sharder=ebc_sharder,
        local_size=eq.WORLD,
        world_size=eq.WORLD,
        device_type="cpu",
    )
    return ShardingPlan({"sequence_embeddings": seq, "profile_embeddings": prof})


@exits_without_finalization
def _plan_worker(
    rank: int, store: str, model_name: str, ec_sharding: str, ebc_sharding: str, plan_path: str, same_lr: bool
) -> None:
    # _worker builds its config with the module's small_config and shards with shard_model: make them the
    # wide config and "shard with the saved plan" in this process.
    def shard_from_file(model, env, features, training, batch_size, plan=None):
        assert plan is None
        loaded = load_plan(plan_path, world_size=env.world_size, features=features)
        dmp = _original_shard_model(model, env, features, training, batch_size, plan=loaded)
        for module_path, module_plan in loaded.plan.items():
            for table, ps in module_plan.items():
                used = dmp.plan.plan[module_path][table]
                assert (used.sharding_type, used.ranks) == (ps.sharding_type, ps.ranks), table
        return dmp

    eq.small_config = lambda *a: wide_config(*a, same_lr=same_lr)
    eq.shard_model = shard_from_file
    eq._worker(rank, store, model_name, ec_sharding, ebc_sharding)


@pytest.mark.parametrize("ec_sharding,ebc_sharding", CASES)
def test_planner_offers_each_sharding_type_on_cpu(ec_sharding: str, ebc_sharding: str) -> None:
    """TorchRec's planner honours each of these constraints for a CPU job of 2 ranks."""
    cfg = wide_config("din", ec_sharding, ebc_sharding)
    model = build_model(cfg, device=torch.device("meta"))
    attach_sparse_optimizer(model, cfg.training)
    env = DistEnv(0, eq.WORLD, 0, eq.WORLD, torch.device("cpu"), "gloo")
    plan = make_plan(model, env, cfg.features, cfg.training.sharding, eq.GLOBAL_BATCH // eq.WORLD)
    types = {t: ps.sharding_type for mp_ in plan.plan.values() for t, ps in mp_.items()}  # type: ignore[union-attr]
    assert types == {"item": ec_sharding, "category": ec_sharding, "user": ebc_sharding, "age": ebc_sharding}


@pytest.mark.parametrize("ec_sharding,ebc_sharding", CASES)
def test_explicit_plan_round_trips_through_a_file(
    tmp_path: Path, ec_sharding: str, ebc_sharding: str
) -> None:
    cfg = wide_config("din", ec_sharding, ebc_sharding)
    plan = explicit_plan(cfg, ec_sharding, ebc_sharding)
    data = plan_to_dict(plan, eq.WORLD, eq.WORLD, "cpu")
    atomic_write_json(tmp_path / "plan.json", data)
    loaded = load_plan(
        tmp_path / "plan.json", world_size=eq.WORLD, features=cfg.features, compute_device="cpu"
    )
    assert plan_to_dict(loaded, eq.WORLD, eq.WORLD, "cpu") == data
    ranks = {t: ps.ranks for mp_ in loaded.plan.values() for t, ps in mp_.items()}  # type: ignore[union-attr]
    for table, kind in [("item", ec_sharding), ("user", ebc_sharding)]:
        if kind in ("column_wise", "row_wise", "data_parallel"):
            assert sorted(ranks[table]) == [0, 1], (table, kind, ranks[table])
    if ec_sharding == "table_wise":
        assert ranks["item"] != ranks["category"], "table-wise tables on different ranks"


def _run_two_ranks(
    tmp_path: Path, ec_sharding: str, ebc_sharding: str, same_lr: bool, profile_rank_offset: int = 0
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = wide_config("din", ec_sharding, ebc_sharding)
    plan = explicit_plan(cfg, ec_sharding, ebc_sharding, profile_rank_offset)
    plan_path = tmp_path / "plan.json"
    atomic_write_json(plan_path, plan_to_dict(plan, eq.WORLD, eq.WORLD, "cpu"))
    store = str(tmp_path / "store")
    mp.spawn(
        _plan_worker,
        args=(store, "din", ec_sharding, ebc_sharding, str(plan_path), same_lr),
        nprocs=eq.WORLD,
        join=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("ec_sharding,ebc_sharding", CASES)
def test_sharded_equals_unsharded(tmp_path: Path, ec_sharding: str, ebc_sharding: str) -> None:
    _run_two_ranks(
        tmp_path, ec_sharding, ebc_sharding, same_lr="data_parallel" in (ec_sharding, ebc_sharding)
    )


@pytest.mark.slow
def test_data_parallel_tables_follow_the_dense_optimizer(tmp_path: Path) -> None:
    _run_two_ranks(tmp_path, "row_wise", "data_parallel", same_lr=False)


@pytest.mark.slow
def test_profile_tables_table_wise_on_reversed_ranks(tmp_path: Path) -> None:
    _run_two_ranks(tmp_path, "row_wise", "table_wise", same_lr=False, profile_rank_offset=1)


def test_one_rank_places_open_tables_table_wise() -> None:
    """A one-process job gets table-wise tables unless the config says otherwise: with one rank the
    planner's estimates tie and row-wise would only add bucketize/permute work per step."""
    cfg = _original_small_config("din", "table_wise")
    cfg.training.sharding = {}
    model = build_model(cfg, device=torch.device("meta"))
    attach_sparse_optimizer(model, cfg.training)
    env = DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo")
    plan = make_plan(model, env, cfg.features, cfg.training.sharding, 64)
    types = {t: ps.sharding_type for mp_ in plan.plan.values() for t, ps in mp_.items()}  # type: ignore[union-attr]
    assert set(types) == {t.name for t in cfg.features.sequence} | {p.name for p in cfg.features.profile}
    assert set(types.values()) == {"table_wise"}, types

    pinned = wide_config("din", "row_wise", "column_wise")
    model = build_model(pinned, device=torch.device("meta"))
    attach_sparse_optimizer(model, pinned.training)
    plan = make_plan(model, env, pinned.features, pinned.training.sharding, 64)
    types = {t: ps.sharding_type for mp_ in plan.plan.values() for t, ps in mp_.items()}  # type: ignore[union-attr]
    assert types["item"] == "row_wise" and types["user"] == "column_wise", types
