"""Deep Interest Evolution Network: GRU interest extractor + auxiliary loss + attention-gated evolution."""

from __future__ import annotations

import torch

from din_torchrec.config import FeaturesConfig, ModelConfig
from din_torchrec.models.base import EmbeddedBatch, Interaction, SequenceCTRModel
from din_torchrec.modules.interest_evolution import (
    AuxiliaryNextBehaviourLoss,
    InterestEvolution,
    InterestExtractor,
    packed_layout,
)


class DIEN(SequenceCTRModel):
    """DIEN (Zhou et al. 2019).

    * interest extractor: a GRU over the behaviours, ``h_t: [N, H]`` (packed: no work on padding);
    * auxiliary loss (training only, weight ``model.dien.aux_loss_weight``): ``h_t`` must score the real next
      behaviour ``e_{t+1}`` above a sampled negative, over the real steps only;
    * interest evolution: attention of the candidate on ``h_t`` gates an AUGRU (or AGRU / AIGRU); its state
      after the last real step, ``[B, H]``, is the user interest.

    ``ModelOutput.attention`` is the evolution attention, ``[N]`` (softmax over each sample's steps).
    """

    def __init__(
        self, features: FeaturesConfig, model: ModelConfig, device: torch.device | None = None
    ) -> None:
        cfg = model.dien
        self.uses_negatives = cfg.aux_loss_weight > 0
        width = features.embedding_dim * len(features.sequence)
        hidden = cfg.gru_hidden or width
        super().__init__(features, model, interest_width=hidden, device=device)
        self.aux_loss_weight = cfg.aux_loss_weight
        self.extractor = InterestExtractor(width, hidden)
        self.evolution = InterestEvolution(
            hidden,
            hidden,
            candidate_dim=width,
            kind=cfg.evolution,
            attention_hidden=model.attention_hidden,
            attention_activation=model.attention_activation,
            dice_eps=model.dice_eps,
            dice_momentum=model.dice_momentum,
        )
        self.auxiliary = (
            AuxiliaryNextBehaviourLoss(hidden, width, scorer="mlp", hidden=tuple(cfg.aux_hidden))
            if self.uses_negatives
            else None
        )

    def interact(self, emb: EmbeddedBatch) -> Interaction:
        layout = packed_layout(emb.lengths)
        # The extractor's states in packed order as well: the evolution's recurrence reads them without a gather.
        states, _, packed = self.extractor.forward_with_packed(emb.behaviours, emb.lengths, layout)
        final, attention = self.evolution(states, emb.lengths, emb.candidates, layout, packed_states=packed)
        aux = None
        if self.auxiliary is not None and self.training:
            if emb.negatives is None:
                raise ValueError("DIEN's auxiliary loss needs negative behaviours in the batch (neg_* keys)")
            aux = self.aux_loss_weight * self.auxiliary(
                states, emb.behaviours, emb.negatives, emb.lengths, layout.segments
            )
        return Interaction(final, attention=attention, aux_loss=aux)
