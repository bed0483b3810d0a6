"""The one place that turns the feature config into TorchRec embedding collections.

Training, planning and serving all call these builders, so they never disagree about table names, sizes or
which features share a table.
"""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from din_torchrec.config import FeaturesConfig
from din_torchrec.data.negatives import negative_column


def sequence_table_configs(features: FeaturesConfig, with_negatives: bool = False) -> list[EmbeddingConfig]:
    """One ``EmbeddingConfig`` per sequence table, serving its candidate and its history feature (and the
    negative behaviours of DIEN's auxiliary loss when ``with_negatives``)."""
    return [
        EmbeddingConfig(
            name=t.name,
            embedding_dim=features.embedding_dim,
            num_embeddings=t.num_embeddings,
            feature_names=[t.target_column, t.history_column]
            + ([negative_column(t.history_column)] if with_negatives else []),
        )
        for t in features.sequence
    ]


def profile_table_configs(features: FeaturesConfig) -> list[EmbeddingBagConfig]:
    """One sum-pooled ``EmbeddingBagConfig`` per profile column."""
    return [
        EmbeddingBagConfig(
            name=p.name,
            embedding_dim=p.embedding_dim or features.embedding_dim,
            num_embeddings=p.num_embeddings,
            feature_names=[p.column],
            pooling=PoolingType.SUM,
        )
        for p in features.profile
    ]


def build_sequence_collection(
    features: FeaturesConfig, device: torch.device | None = None, with_negatives: bool = False
) -> EmbeddingCollection:
    """``EmbeddingCollection`` (per-position lookups) for the candidate and behaviour ids."""
    return EmbeddingCollection(tables=sequence_table_configs(features, with_negatives), device=device)


def build_profile_collection(
    features: FeaturesConfig, device: torch.device | None = None
) -> EmbeddingBagCollection | None:
    """``EmbeddingBagCollection`` for the profile columns, or None when there are none."""
    if not features.profile:
        return None
    return EmbeddingBagCollection(tables=profile_table_configs(features), device=device)


def table_of_feature(features: FeaturesConfig) -> dict[str, str]:
    """Feature (column) name -> table name, for every id column."""
    out = {}
    for t in features.sequence:
        out[t.target_column] = t.name
        out[t.history_column] = t.name
    for p in features.profile:
        out[p.column] = p.name
    return out
