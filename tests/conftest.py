"""Shared fixtures: a small generated dataset and a config that trains on it in seconds."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from din_torchrec.config import ExperimentConfig, GeneratorConfig, ProfileTableConfig, SequenceTableConfig
from din_torchrec.data.generator import generate_dataset

SMALL_GENERATOR = GeneratorConfig(
    num_users=3000,
    num_items=3000,
    num_categories=40,
    train_samples=48_000,
    test_samples=12_000,
    samples_per_user=8,
    max_history=30,
    rows_per_file=20_000,
    row_group_size=8192,
    seed=3,
)


def small_experiment(data_dir: str | Path, out_dir: str | Path, model: str = "din") -> ExperimentConfig:
    """A config sized for tests: small tables, 2 epochs of a 48k-sample dataset."""
    g = SMALL_GENERATOR
    cfg = ExperimentConfig()
    cfg.data.dir = str(data_dir)
    cfg.data.generator = copy.deepcopy(g)
    cfg.data.max_history = g.max_history
    cfg.data.batch_size = 512
    cfg.data.eval_batch_size = 2048
    cfg.data.shuffle_buffer = 16384
    cfg.features.embedding_dim = 16
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
    cfg.model.attention_hidden = [40, 20]
    cfg.model.mlp_hidden = [64, 32]
    cfg.training.epochs = 2
    cfg.training.progress = False
    cfg.training.log_every = 20
    cfg.training.regularization.coefficient = 1e-4
    cfg.training.output_dir = str(out_dir)
    return cfg.validate()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small generated dataset, made once per test process."""
    out = tmp_path_factory.mktemp("small_dataset")
    generate_dataset(SMALL_GENERATOR, out, progress=False)
    return out
