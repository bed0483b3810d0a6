"""Deep Session Interest Network: sessions, self-attention inside them, Bi-LSTM across them."""

from __future__ import annotations

import torch

from din_torchrec.config import FeaturesConfig, ModelConfig
from din_torchrec.models.base import EmbeddedBatch, Interaction, SequenceCTRModel
from din_torchrec.modules.session_interest import DSINInteraction


class DSIN(SequenceCTRModel):
    """DSIN (Feng et al. 2019).

    The history is cut into sessions wherever the gap between behaviours exceeds
    ``model.dsin.session_gap_seconds``; the most recent ``max_sessions`` sessions of at most
    ``max_session_length`` behaviours are kept; bias encoding, multi-head self-attention inside each session
    and a Bi-LSTM across sessions follow; target attention from the candidate over the session interests and
    over the Bi-LSTM states gives ``[B, S + 2 * lstm_hidden]``.

    ``ModelOutput.attention`` is the attention over the session interests, ``[B, max_sessions]``.
    """

    def __init__(
        self, features: FeaturesConfig, model: ModelConfig, device: torch.device | None = None
    ) -> None:
        cfg = model.dsin
        width = features.embedding_dim * len(features.sequence)
        interaction = DSINInteraction(
            width,
            cfg.heads,
            cfg.max_sessions,
            cfg.max_session_length,
            cfg.session_gap_seconds,
            cfg.lstm_hidden,
            model.attention_hidden,
            model.attention_activation,
            ffn_hidden=cfg.ffn_hidden,
            dice_eps=model.dice_eps,
            dice_momentum=model.dice_momentum,
        )
        super().__init__(features, model, interest_width=interaction.out_width, device=device)
        self.interaction = interaction

    def interact(self, emb: EmbeddedBatch) -> Interaction:
        interest, attention = self.interaction(emb.behaviours, emb.timestamps, emb.lengths, emb.candidates)
        return Interaction(interest, attention=attention)
