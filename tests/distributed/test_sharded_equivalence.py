"""Sharded equals unsharded: 2 gloo processes under DistributedModelParallel vs 1 process, plain PyTorch.

Each rank trains on its half of a global batch; the reference trains an unsharded copy of the same model
on the whole batch with plain ``torch.optim.SGD``. Logits before the step, every updated weight after it and
the logits after it must agree. The loss includes the mini-batch-aware regularizer (count mode), which also
checks its world-size scaling.
"""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import ShardedTensor

from din_torchrec.config import ExperimentConfig, ProfileTableConfig, SequenceTableConfig, TableShardingConfig
from din_torchrec.data.batch import slice_batch
from din_torchrec.data.random_batch import random_batch
from din_torchrec.distributed.env import DistEnv, exits_without_finalization
from din_torchrec.distributed.sharding import dense_optimizer, shard_model
from din_torchrec.embeddings.tables import table_of_feature
from din_torchrec.models import build_model
from din_torchrec.training.regularization import kjt_mba_coefficients
from din_torchrec.training.trainer import compute_loss

WORLD = 2
GLOBAL_BATCH = 16


def small_config(model: str, ec_sharding: str, ebc_sharding: str = "table_wise") -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.features.embedding_dim = 8
    cfg.features.sequence = [
        SequenceTableConfig("item", 300, "target_item_id", "hist_item_ids"),
        SequenceTableConfig("category", 24, "target_cate_id", "hist_cate_ids"),
    ]
    cfg.features.profile = [
        ProfileTableConfig("user", 40, "user_id"),
        ProfileTableConfig("age", 8, "user_age"),
    ]
    cfg.model.name = model  # type: ignore[assignment]
    cfg.model.attention_activation = "prelu"  # Dice's batch statistics are per rank, like BatchNorm
    cfg.model.mlp_activation = "prelu"
    cfg.model.attention_normalization = "softmax"
    cfg.model.attention_hidden = [16, 8]
    cfg.model.mlp_hidden = [32, 16]
    cfg.training.sparse_optimizer = "sgd"
    cfg.training.dense_optimizer = "sgd"
    cfg.training.lr_sparse = 0.3
    cfg.training.lr_dense = 0.2
    cfg.training.grad_clip_norm = 0.0
    cfg.training.regularization.coefficient = 0.05
    cfg.training.regularization.mode = "count"
    cfg.model.dien.aux_loss_weight = 0.0  # a mean over each rank's (t, t+1) pairs: not additive over ranks
    cfg.model.dsin.heads = 2
    cfg.model.dsin.lstm_hidden = 8
    cfg.model.dsin.session_gap_seconds = 900
    cfg.training.sharding = {
        "item": TableShardingConfig([ec_sharding], []),
        "category": TableShardingConfig([ec_sharding], []),
        "user": TableShardingConfig([ebc_sharding], []),
        "age": TableShardingConfig([ebc_sharding], []),
    }
    return cfg.validate()


def _frequencies(cfg: ExperimentConfig) -> dict:
    g = torch.Generator().manual_seed(7)
    out = {
        t.name: torch.randint(1, 50, (t.num_embeddings,), generator=g).numpy() for t in cfg.features.sequence
    }
    out.update(
        {p.name: torch.randint(1, 50, (p.num_embeddings,), generator=g).numpy() for p in cfg.features.profile}
    )
    return out


def _reference_slice(full: torch.Tensor, offsets: list[int], shape: torch.Size) -> torch.Tensor:
    index = tuple(slice(o, o + s) for o, s in zip(offsets, shape))
    return full[index]


def _worker(rank: int, store: str, model_name: str, ec_sharding: str, ebc_sharding: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        env = DistEnv(rank, WORLD, rank, WORLD, torch.device("cpu"), "gloo")
        cfg = small_config(model_name, ec_sharding, ebc_sharding)
        torch.manual_seed(0)
        model = build_model(cfg)
        reference = copy.deepcopy(model)

        batch = random_batch(cfg.features, GLOBAL_BATCH, 10, torch.Generator().manual_seed(1), min_history=0)
        freqs = _frequencies(cfg)
        tables = table_of_feature(cfg.features)
        batch.reg_weights = {
            **kjt_mba_coefficients(batch.sequence_features, tables, freqs, "count"),
            **kjt_mba_coefficients(batch.profile_features, tables, freqs, "count"),
        }
        per_rank = GLOBAL_BATCH // WORLD
        local = slice_batch(batch, rank * per_rank, (rank + 1) * per_rank)

        dmp = shard_model(model, env, cfg.features, cfg.training, per_rank)
        opt = dense_optimizer(dmp, cfg.training)
        out = dmp(local)
        loss, _ = compute_loss(out, local, cfg, WORLD)
        opt.zero_grad()
        loss.backward()
        opt.step()

        table_params = [p for n, p in reference.named_parameters() if "embeddings" in n]
        dense_params = [p for n, p in reference.named_parameters() if "embeddings" not in n]
        ref_opt = torch.optim.SGD(
            [
                {"params": table_params, "lr": cfg.training.lr_sparse},
                {"params": dense_params, "lr": cfg.training.lr_dense},
            ]
        )
        ref_out = reference(batch)
        ref_loss, _ = compute_loss(ref_out, batch, cfg, 1)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()

        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        torch.testing.assert_close(out.logits, ref_out.logits[rows], rtol=1e-5, atol=1e-6)

        ref_state = reference.state_dict()
        checked = 0
        for name, value in dmp.state_dict().items():
            full = ref_state[name]
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    expect = _reference_slice(full, shard.metadata.shard_offsets, shard.tensor.shape)
                    torch.testing.assert_close(
                        shard.tensor, expect, rtol=1e-5, atol=1e-6, msg=f"{name} shard"
                    )
                    checked += 1
            else:
                torch.testing.assert_close(value, full, rtol=1e-5, atol=1e-6, msg=name)
                checked += 1
        assert checked > 0

        # The updated model gives the same logits too.
        with torch.no_grad():
            torch.testing.assert_close(dmp(local).logits, reference(batch).logits[rows], rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


@exits_without_finalization
def _rank(rank: int, store: str, model_name: str, ec_sharding: str, ebc_sharding: str) -> None:
    """A spawned rank: ``_worker``, then out without interpreter teardown (see ``exit_process``)."""
    _worker(rank, store, model_name, ec_sharding, ebc_sharding)


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_name,ec_sharding",
    [
        ("din", "table_wise"),
        ("din", "row_wise"),
        ("base", "row_wise"),
        ("dien", "row_wise"),
        ("dsin", "table_wise"),
    ],
)
def test_two_gloo_ranks_equal_one_unsharded_process(tmp_path, model_name: str, ec_sharding: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    store = str(tmp_path / "store")
    mp.spawn(_rank, args=(store, model_name, ec_sharding, "table_wise"), nprocs=WORLD, join=True)
