"""The shared front of every model (embeddings) and the DIN paper's base model (sum pooling)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from din_torchrec.config import FeaturesConfig, ModelConfig
from din_torchrec.data.batch import Batch
from din_torchrec.data.negatives import negative_column
from din_torchrec.embeddings.tables import build_profile_collection, build_sequence_collection
from din_torchrec.models.output import ModelOutput
from din_torchrec.modules.attention import segment_ids
from din_torchrec.modules.mlp import MLP


@dataclass
class EmbeddedBatch:
    """The looked-up embeddings of a batch.

    Attributes:
        candidates: ``[B, S]``, the candidate's rows of every sequence table concatenated (S = D * tables).
        behaviours: ``[N, S]``, the history rows, jagged (sample after sample, oldest first).
        lengths: ``[B]`` history length per sample.
        profile: ``[B, P]`` pooled profile embeddings, or None.
        rows: feature name -> looked-up rows, for the regularizer.
        timestamps: ``[N]`` unix seconds of the behaviours.
        negatives: ``[N, S]`` one negative behaviour per history position (DIEN's auxiliary loss), or None.
    """

    candidates: torch.Tensor
    behaviours: torch.Tensor
    lengths: torch.Tensor
    profile: torch.Tensor | None
    rows: dict[str, torch.Tensor]
    timestamps: torch.Tensor
    negatives: torch.Tensor | None = None


@dataclass
class Interaction:
    """What an interaction module gives the top MLP.

    Attributes:
        interest: ``[B, U]`` user interest vector.
        attention: model-specific attention weights for inspection (DIN/DIEN: ``[N]`` per behaviour or
            step; DSIN: ``[B, K]`` per session), or None.
        aux_loss: scalar added to the training loss (DIEN), or None.
    """

    interest: torch.Tensor
    attention: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class SequenceCTRModel(nn.Module):
    """Embeddings + an interaction over the behaviour sequence + the top MLP.

    Subclasses implement :meth:`interact`, which turns an :class:`EmbeddedBatch` into a ``[B, U]`` user
    interest vector (and optionally per-behaviour attention weights). The top MLP sees
    ``[profile, candidate, interest]``.
    """

    #: Whether the batch must carry negative behaviours (``neg_<history_column>`` keys).
    uses_negatives: bool = False

    def __init__(
        self,
        features: FeaturesConfig,
        model: ModelConfig,
        interest_width: int,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        self.features = features
        self.model_config = model
        self.sequence_embeddings = build_sequence_collection(
            features, device, with_negatives=self.uses_negatives
        )
        self.profile_embeddings = build_profile_collection(features, device)
        self.behaviour_width = features.embedding_dim * len(features.sequence)
        self.profile_width = sum(p.embedding_dim or features.embedding_dim for p in features.profile)
        top_in = self.profile_width + self.behaviour_width + interest_width
        self.top = MLP(top_in, model.mlp_hidden, model.mlp_activation, 1, model.dice_eps, model.dice_momentum)

    def embed(self, batch: Batch) -> EmbeddedBatch:
        seq = self.sequence_embeddings(batch.sequence_features)
        rows: dict[str, torch.Tensor] = {}
        cands, hists = [], []
        for t in self.features.sequence:
            cand = seq[t.target_column].values()
            hist = seq[t.history_column].values()
            rows[t.target_column] = cand
            rows[t.history_column] = hist
            cands.append(cand)
            hists.append(hist)
        lengths = seq[self.features.sequence[0].history_column].lengths()
        negatives = None
        if self.uses_negatives:
            negs = [seq[negative_column(t.history_column)].values() for t in self.features.sequence]
            negatives = torch.cat(negs, dim=-1) if len(negs) > 1 else negs[0]
        profile = None
        if self.profile_embeddings is not None:
            # By key, in config order: a sharded EBC's KeyedTensor orders its keys by rank, so values()
            # would hand the top MLP permuted columns under some plans (and a checkpoint loaded under
            # another plan would silently mis-predict).
            pooled = self.profile_embeddings(batch.profile_features).to_dict()
            profile = torch.cat([pooled[p.column] for p in self.features.profile], dim=-1)
            # Profile bags hold exactly one id per sample, so the pooled row is the looked-up row.
            rows.update(pooled)
        return EmbeddedBatch(
            candidates=torch.cat(cands, dim=-1) if len(cands) > 1 else cands[0],
            behaviours=torch.cat(hists, dim=-1) if len(hists) > 1 else hists[0],
            lengths=lengths,
            profile=profile,
            rows=rows,
            timestamps=batch.hist_timestamps,
            negatives=negatives,
        )

    def interact(self, emb: EmbeddedBatch) -> Interaction:
        raise NotImplementedError

    def forward(self, batch: Batch) -> ModelOutput:
        emb = self.embed(batch)
        inter = self.interact(emb)
        parts = [emb.candidates, inter.interest]
        if emb.profile is not None:
            parts.insert(0, emb.profile)
        logits = self.top(torch.cat(parts, dim=-1)).squeeze(-1)
        return ModelOutput(
            logits=logits, aux_loss=inter.aux_loss, attention=inter.attention, embeddings=emb.rows
        )


class BaseModel(SequenceCTRModel):
    """The DIN paper's Embedding&MLP base model: the history is sum-pooled, blind to the candidate.

    ``interest: [B, S] = sum_j e_{b_j}``.
    """

    def __init__(
        self, features: FeaturesConfig, model: ModelConfig, device: torch.device | None = None
    ) -> None:
        super().__init__(
            features, model, interest_width=features.embedding_dim * len(features.sequence), device=device
        )

    def interact(self, emb: EmbeddedBatch) -> Interaction:
        pooled = torch.zeros_like(emb.candidates).index_add(0, segment_ids(emb.lengths), emb.behaviours)
        return Interaction(pooled)
