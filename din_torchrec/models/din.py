"""Deep Interest Network: target attention over the behaviour sequence."""

from __future__ import annotations

import torch

from din_torchrec.config import FeaturesConfig, ModelConfig
from din_torchrec.models.base import EmbeddedBatch, Interaction, SequenceCTRModel
from din_torchrec.modules.attention import TargetAttentionPooling


class DIN(SequenceCTRModel):
    """DIN: ``interest [B, S] = sum_j a(e_{b_j}, e_c) e_{b_j}`` with the local activation unit ``a``.

    ``ModelOutput.attention`` holds ``a`` for every behaviour (``[N]``, jagged like the history).
    """

    def __init__(
        self, features: FeaturesConfig, model: ModelConfig, device: torch.device | None = None
    ) -> None:
        width = features.embedding_dim * len(features.sequence)
        super().__init__(features, model, interest_width=width, device=device)
        self.attention = TargetAttentionPooling(
            width,
            model.attention_hidden,
            model.attention_activation,
            model.attention_normalization,
            model.dice_eps,
            model.dice_momentum,
        )

    def interact(self, emb: EmbeddedBatch) -> Interaction:
        pooled, weights = self.attention(emb.behaviours, emb.lengths, emb.candidates)
        return Interaction(pooled, attention=weights)
