"""Fixtures of the serving tests: one thread per process, a tiny trained run, random-weight models."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from din_torchrec.config import ExperimentConfig
from din_torchrec.models import build_model
from din_torchrec.models.base import SequenceCTRModel
from tests.conftest import SMALL_GENERATOR, small_experiment

MAX_HISTORY = 12


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """The 2 shared cores are contended: two intra-op threads per process ran ~50x slower than one here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(model: str, **model_overrides) -> ExperimentConfig:
    """The small test experiment with short histories (no data: random weights)."""
    cfg = small_experiment("unused-data", "unused-run", model)
    cfg.data.max_history = MAX_HISTORY
    for key, value in model_overrides.items():
        target = cfg.model
        *path, last = key.split("__")
        for p in path:
            target = getattr(target, p)
        setattr(target, last, value)
    return cfg.validate()


def random_model(cfg: ExperimentConfig, seed: int = 0) -> SequenceCTRModel:
    """A model of ``cfg`` with random weights and random Dice running statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if hasattr(m, "running_var"):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
        if hasattr(m, "alpha"):
            m.alpha.data.copy_(torch.rand(m.alpha.shape, generator=g) - 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DIN trained for a few steps by the trainer on a small generated dataset; returns the run folder.

    The trainer's process group is destroyed afterwards, so loading is tested without one.
    """
    from din_torchrec.data.generator import generate_dataset
    from din_torchrec.distributed.env import shutdown_distributed
    from din_torchrec.training.trainer import train

    root = tmp_path_factory.mktemp("serving_run")
    g = copy.deepcopy(SMALL_GENERATOR)
    g.train_samples, g.test_samples, g.rows_per_file = 12_000, 4_000, 8_000
    generate_dataset(g, root / "data", progress=False)
    cfg = small_experiment(root / "data", root / "run", "din")
    cfg.data.generator = g
    cfg.training.epochs = 1
    cfg.training.max_steps_per_epoch = 20
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(before)
        shutdown_distributed()
    return root / "run"
