"""Gradient accumulation and bf16 autocast in the training step."""

from __future__ import annotations

import copy

import pytest
import torch

from din_torchrec.config import ExperimentConfig, ProfileTableConfig, SequenceTableConfig
from din_torchrec.data.batch import slice_batch
from din_torchrec.data.random_batch import random_batch
from din_torchrec.distributed.env import init_distributed
from din_torchrec.distributed.sharding import dense_optimizer, shard_model
from din_torchrec.models import build_model
from din_torchrec.training.trainer import train_micro_step


def _config(accumulation: int, precision: str = "fp32") -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.features.embedding_dim = 8
    cfg.features.sequence = [SequenceTableConfig("item", 200, "target_item_id", "hist_item_ids")]
    cfg.features.profile = [ProfileTableConfig("user", 40, "user_id")]
    cfg.model.name = "din"  # type: ignore[assignment]
    cfg.model.attention_activation = "prelu"  # Dice would see different batch statistics per micro-batch
    cfg.model.mlp_activation = "prelu"
    cfg.model.attention_hidden = [16]
    cfg.model.mlp_hidden = [16]
    cfg.training.sparse_optimizer = "sgd"
    cfg.training.lr_sparse = 0.0  # tables frozen: fused updates between micro-batches would differ by design
    cfg.training.dense_optimizer = "sgd"
    cfg.training.lr_dense = 0.5
    cfg.training.grad_clip_norm = 0.0
    cfg.training.grad_accumulation_steps = accumulation
    cfg.training.precision = precision  # type: ignore[assignment]
    return cfg.validate()


def _dense_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "embeddings" not in k}


@pytest.mark.parametrize("k", [2, 4])
def test_accumulating_k_micro_batches_equals_one_k_times_larger_batch(k: int) -> None:
    env = init_distributed("gloo")
    batch = random_batch(_config(1).features, 8 * k, 10, torch.Generator().manual_seed(5))
    results = {}
    for steps in (1, k):
        cfg = _config(steps)
        torch.manual_seed(0)
        model = shard_model(build_model(cfg), env, cfg.features, cfg.training, 8 * k)
        opt = dense_optimizer(model, cfg.training)
        params = list(opt.params.values())
        parts = [batch] if steps == 1 else [slice_batch(batch, i * 8, (i + 1) * 8) for i in range(k)]
        for i, b in enumerate(parts):
            train_micro_step(model, opt, params, b, cfg, env, i)
        results[steps] = _dense_state(model)
    before = _dense_state(
        shard_model(build_model(_config(1)), env, _config(1).features, _config(1).training, 8)
    )
    for name, value in results[1].items():
        torch.testing.assert_close(results[k][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(results[1][n], before[n]) for n in before), "no dense parameter moved"


def test_no_step_before_the_last_micro_batch() -> None:
    env = init_distributed("gloo")
    cfg = _config(3)
    torch.manual_seed(0)
    model = shard_model(build_model(cfg), env, cfg.features, cfg.training, 8)
    opt = dense_optimizer(model, cfg.training)
    start = _dense_state(model)
    batch = random_batch(cfg.features, 8, 10, torch.Generator().manual_seed(1))
    for i in range(2):
        train_micro_step(model, opt, list(opt.params.values()), batch, cfg, env, i)
        assert all(torch.equal(v, start[n]) for n, v in _dense_state(model).items())
    train_micro_step(model, opt, list(opt.params.values()), batch, cfg, env, 2)
    assert any(not torch.equal(v, start[n]) for n, v in _dense_state(model).items())


@pytest.mark.parametrize("activation", ["prelu", "dice"])
def test_bf16_autocast_step_is_close_to_fp32(activation: str) -> None:
    """Dice included: its bf16 batch statistics must update its fp32 running statistics."""
    env = init_distributed("gloo")
    batch = random_batch(_config(1).features, 64, 10, torch.Generator().manual_seed(2))
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = _config(1, precision)
        cfg.model.attention_activation = activation  # type: ignore[assignment]
        cfg.model.mlp_activation = activation  # type: ignore[assignment]
        torch.manual_seed(0)
        model = shard_model(build_model(cfg), env, cfg.features, cfg.training, 64)
        opt = dense_optimizer(model, cfg.training)
        losses[precision] = train_micro_step(
            model, opt, list(opt.params.values()), copy.deepcopy(batch), cfg, env
        ).click
    assert losses["bf16"] == pytest.approx(losses["fp32"], abs=2e-2)
    assert losses["bf16"] != losses["fp32"], "autocast did not engage: bf16 matmuls round differently"


def test_cache_in_memory_trains_and_evaluates_without_the_files(tmp_path, small_dataset) -> None:
    """data.cache_in_memory: the Trainer loads both splits when it is built; fit then needs no data file (the
    folder is moved away), and the epochs see the rows (a reader that skipped them would not learn)."""
    import shutil

    from din_torchrec.training.trainer import Trainer
    from tests.conftest import small_experiment

    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    cfg = small_experiment(data, tmp_path / "out")
    cfg.training.epochs = 1
    cfg.data.cache_in_memory = True
    trainer = Trainer(cfg)
    assert trainer.train_reader.cached_bytes() > 0 and trainer.eval_reader.cached_bytes() > 0
    data.rename(tmp_path / "moved")
    metrics = trainer.fit()
    assert metrics["steps"] == trainer.train_reader.num_batches() > 0
    assert metrics["final"]["auc"] > 0.6, metrics["final"]


def _tbe_bounds_check_modes(model: torch.nn.Module) -> list[int]:
    """FBGEMM's bounds-check mode of every table-batched embedding module inside the sharded collections."""
    modes = []
    for m in model.modules():
        for lookup in getattr(m, "_lookups", []):
            for emb in getattr(lookup, "_emb_modules", []):
                modes.append(emb.emb_module.bounds_check_mode_int)
    return modes


@pytest.mark.parametrize("mode", ["none", "warning", "fatal"])
def test_embedding_bounds_check_reaches_every_fbgemm_table(mode: str) -> None:
    """training.embedding_bounds_check sets FBGEMM's id check of the EmbeddingCollection's and the
    EmbeddingBagCollection's kernels ("none" by default: the readers check every id before a batch exists)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

    assert ExperimentConfig().training.embedding_bounds_check == "none"
    env = init_distributed("gloo")
    cfg = _config(1)
    cfg.training.embedding_bounds_check = mode  # type: ignore[assignment]
    model = shard_model(build_model(cfg), env, cfg.features, cfg.training, 8)
    modes = _tbe_bounds_check_modes(model)
    assert len(modes) == 2 and set(modes) == {BoundsCheckMode[mode.upper()].value}, modes
