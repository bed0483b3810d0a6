"""Models: embeddings + an interaction module -> logit."""

from __future__ import annotations

import torch

from din_torchrec.config import ExperimentConfig
from din_torchrec.models.base import BaseModel, SequenceCTRModel
from din_torchrec.models.dien import DIEN
from din_torchrec.models.din import DIN
from din_torchrec.models.dsin import DSIN
from din_torchrec.models.output import ModelOutput

MODELS: dict[str, type[SequenceCTRModel]] = {"base": BaseModel, "din": DIN, "dien": DIEN, "dsin": DSIN}


def build_model(cfg: ExperimentConfig, device: torch.device | None = None) -> SequenceCTRModel:
    """The model named by ``cfg.model.name``, with its embedding collections on ``device``."""
    try:
        cls = MODELS[cfg.model.name]
    except KeyError as e:
        raise ValueError(f"model.name: expected one of {sorted(MODELS)}, got {cfg.model.name!r}") from e
    return cls(cfg.features, cfg.model, device=device)


__all__ = ["DIEN", "DIN", "DSIN", "MODELS", "BaseModel", "ModelOutput", "SequenceCTRModel", "build_model"]
