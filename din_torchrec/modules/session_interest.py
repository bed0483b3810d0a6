"""DSIN (Deep Session Interest Network) interaction: sessions -> bias encoding -> per-session self-attention
-> Bi-LSTM across sessions -> target attention from the candidate.

Pipeline on a batch of B samples, width D, at most K sessions of at most L behaviours
(layout of the dense block: see :mod:`din_torchrec.modules.sessions`, real slots left-aligned, oldest
kept session first):

1. :func:`~din_torchrec.modules.sessions.sessionize`: jagged ``[N, D]`` -> ``[B, K, L, D]`` + masks.
2. :class:`BiasEncoding`: ``Q + BE``, ``BE[k, t, c] = w^K_k + w^T_t + w^C_c``.
3. :class:`SessionInterestExtractor`: a transformer layer inside every session (all sessions of the batch
   at once), average pooled over the session's real behaviours -> ``I [B, K, D]``.
4. :class:`SessionInterestInteractor`: Bi-LSTM over the real sessions -> ``H [B, K, 2h]``.
5. :class:`SessionTargetAttention` twice (over I and over H), softmax over real sessions ->
   ``[U^I, U^H]``, width ``U = D + 2h``.

Padding never leaks: every stage masks (self-attention keys, pooling, packed LSTM, softmax), so a model
built with larger K or L gives the same output on the same data (the bias-encoding rows of real slots
being equal).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from din_torchrec.modules.attention import LocalActivationUnit
from din_torchrec.modules.attention_family import MultiHeadSelfAttention, masked_softmax
from din_torchrec.modules.sessions import sessionize


class BiasEncoding(nn.Module):
    """DSIN's bias encoding: ``BE[k, t, c] = w^K_k + w^T_t + w^C_c`` added to every behaviour embedding.

    ``w^K`` is a bias per session slot, ``w^T`` per position inside a session, ``w^C`` per embedding unit;
    ``K + L + D`` parameters instead of a ``K * L * D`` table. Initialised like DeepCTR's (truncated normal,
    std 1e-4), so it starts as an almost-identity.

    Args:
        max_sessions: K.
        max_session_len: L.
        dim: D.

    Shapes: ``sessions [B, K, L, D] -> [B, K, L, D]`` (padded slots get the bias too; they are masked later).
    """

    def __init__(self, max_sessions: int, max_session_len: int, dim: int) -> None:
        super().__init__()
        self.session_bias = nn.Parameter(torch.empty(max_sessions))
        self.position_bias = nn.Parameter(torch.empty(max_session_len))
        self.unit_bias = nn.Parameter(torch.empty(dim))
        for p in (self.session_bias, self.position_bias, self.unit_bias):
            nn.init.trunc_normal_(p, std=1e-4, a=-2e-4, b=2e-4)

    def encoding(self) -> torch.Tensor:
        """The ``[K, L, D]`` table BE."""
        return self.session_bias[:, None, None] + self.position_bias[None, :, None] + self.unit_bias

    def forward(self, sessions: torch.Tensor) -> torch.Tensor:
        return sessions + self.encoding()


class SessionInterestExtractor(nn.Module):
    """One interest per session: a transformer layer inside each session, then mean over its real behaviours.

    ``h = LN(x + MHSA(x))``, ``h = LN(h + FFN(h))`` (post-norm; without ``layer_norm`` just the residuals),
    ``I_k = mean_{t real} h_{k,t}``. All non-empty sessions of the batch go through one
    ``[M, L, D]`` attention call (M = number of non-empty sessions); empty sessions are skipped and give
    zeros.

    Args:
        dim: D, divisible by ``heads``.
        heads: attention heads.
        ffn_hidden: hidden width of the position-wise FFN; None -> ``4 * dim``; 0 -> no FFN.
        layer_norm: apply LayerNorm after each residual.
        fused: passed to :class:`MultiHeadSelfAttention`.

    Shapes: ``sessions [B, K, L, D], behaviour_mask [B, K, L] bool -> interests [B, K, D]``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_hidden: int | None = None,
        layer_norm: bool = True,
        fused: bool = True,
    ) -> None:
        super().__init__()
        self.attention = MultiHeadSelfAttention(dim, heads, fused=fused)
        hidden = 4 * dim if ffn_hidden is None else ffn_hidden
        self.ffn = (
            nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)) if hidden > 0 else None
        )
        self.norm1 = nn.LayerNorm(dim) if layer_norm else nn.Identity()
        self.norm2 = nn.LayerNorm(dim) if layer_norm and self.ffn is not None else nn.Identity()

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The transformer layer on ``[M, L, D]`` sessions with mask ``[M, L]``; rows at padded positions are
        meaningless (callers pool with the mask)."""
        h = self.norm1(x + self.attention(x, mask))
        if self.ffn is not None:
            h = self.norm2(h + self.ffn(h))
        return h

    def forward(self, sessions: torch.Tensor, behaviour_mask: torch.Tensor) -> torch.Tensor:
        b, k, t, d = sessions.shape
        flat = sessions.reshape(b * k, t, d)
        mask = behaviour_mask.reshape(b * k, t)
        # Only non-empty sessions are encoded: padding sessions would cost compute and, with LayerNorm on
        # all-padding rows, nothing useful.
        real = mask.any(dim=1).nonzero().squeeze(1)
        x, m = flat.index_select(0, real), mask.index_select(0, real)
        h = self.encode(x, m)
        mf = m.unsqueeze(-1).to(h.dtype)
        pooled = (h * mf).sum(1) / mf.sum(1)  # every selected session has >= 1 real behaviour
        return flat.new_zeros(b * k, d).index_copy(0, real, pooled).view(b, k, d)


class SessionInterestInteractor(nn.Module):
    """Bi-LSTM across the session interests of each sample, packed by its number of real sessions so that
    padding sessions enter neither direction.

    Args:
        dim: D, the width of a session interest.
        hidden: h, the LSTM hidden size per direction.

    Shapes: ``interests [B, K, D], session_mask [B, K] bool (a prefix of each row) -> states [B, K, 2h]``
    (``[forward, backward]`` concatenated; zeros at padding sessions and for samples without sessions).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True)
        self.out_width = 2 * hidden

    def forward(self, interests: torch.Tensor, session_mask: torch.Tensor) -> torch.Tensor:
        b, k, _ = interests.shape
        counts = session_mask.sum(dim=1)
        out = interests.new_zeros(b, k, self.out_width)
        real = (counts > 0).nonzero().squeeze(1)
        if real.numel() == 0:  # pack_padded_sequence rejects empty batches and zero lengths
            return out
        packed = pack_padded_sequence(
            interests.index_select(0, real),
            counts.index_select(0, real).cpu(),
            batch_first=True,
            enforce_sorted=False,
        )
        states, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=k)
        return out.index_copy(0, real, states)


class SessionTargetAttention(nn.Module):
    """Attention from the candidate over per-session vectors, softmax over the real sessions.

    * ``hidden == []``: DSIN's bilinear activation, ``score_k = s_k^T W c`` (W: ``[width, query_dim]``).
    * otherwise: DIN's local activation unit on ``[s_k, c', s_k - c', s_k * c']`` with ``c' = P c`` projected
      to the key width (identity when the widths agree). Only real sessions are scored, so Dice's batch
      statistics never see padding.

    Args:
        width: W, the width of a session vector (key and value).
        query_dim: width of the candidate.
        hidden: hidden sizes of the local activation unit, or ``[]`` for the bilinear form.
        activation: the unit's activation (``dice``, ``prelu``, ...).

    Shapes: ``keys [B, K, W], mask [B, K] bool, query [B, Dq] -> (pooled [B, W], weights [B, K])``; weights
    are 0 at padding and all 0 (pooled 0) for a sample without sessions.
    """

    def __init__(
        self,
        width: int,
        query_dim: int,
        hidden: list[int],
        activation: str = "dice",
        dice_eps: float = 1e-8,
        dice_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        self.bilinear: nn.Linear | None = None
        self.unit: LocalActivationUnit | None = None
        if hidden:
            self.project: nn.Module = (
                nn.Identity() if width == query_dim else nn.Linear(query_dim, width, bias=False)
            )
            self.unit = LocalActivationUnit(width, hidden, activation, dice_eps, dice_momentum)
        else:
            self.bilinear = nn.Linear(query_dim, width, bias=False)

    def forward(
        self, keys: torch.Tensor, mask: torch.Tensor, query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bilinear is not None:
            scores = torch.einsum("bkw,bw->bk", keys, self.bilinear(query))
        else:
            assert self.unit is not None
            b, k, w = keys.shape
            # Jagged over the real (sample, session) pairs: the rows of a sample are contiguous in keys[mask].
            segments = mask.nonzero()[:, 0]
            real_scores = self.unit.scores_jagged(keys[mask], self.project(query), segments)
            scores = real_scores.new_zeros(b, k).masked_scatter(mask, real_scores)
        weights = masked_softmax(scores, mask)
        return torch.einsum("bk,bkw->bw", weights, keys), weights


class DSINOutput(NamedTuple):
    """Everything :meth:`DSINInteraction.forward_sessions` computes.

    Attributes:
        interest: ``[B, U]``, ``U = D + 2 * lstm_hidden``: ``[U^I, U^H]``.
        interest_attention: ``[B, K]`` weights over the session interests I (0 at padding).
        state_attention: ``[B, K]`` weights over the Bi-LSTM states H (0 at padding).
        session_mask: ``[B, K]`` bool.
    """

    interest: torch.Tensor
    interest_attention: torch.Tensor
    state_attention: torch.Tensor
    session_mask: torch.Tensor


class DSINInteraction(nn.Module):
    """DSIN's interaction over a jagged behaviour history: sessionize -> bias encoding -> session interest
    extractor -> Bi-LSTM interactor -> target attention over I and over H.

    Args:
        dim: D, width of a behaviour and of the candidate; divisible by ``heads``.
        heads: self-attention heads inside a session.
        max_sessions: K, most recent sessions kept.
        max_session_len: L, most recent behaviours kept per session.
        gap_seconds: a gap strictly greater than this starts a new session.
        lstm_hidden: h, Bi-LSTM hidden size per direction.
        attention_hidden: hidden sizes of the candidate's local activation units; ``[]`` selects the DSIN
            paper's bilinear activation ``softmax_k(I_k W c)``.
        attention_activation: activation of the local activation units.
        ffn_hidden: FFN width of the extractor (None -> ``4 * dim``, 0 -> none).
        fused: fused scaled-dot-product attention kernel in the extractor.

    ``out_width`` = U = ``dim + 2 * lstm_hidden``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        max_sessions: int,
        max_session_len: int,
        gap_seconds: int,
        lstm_hidden: int,
        attention_hidden: list[int],
        attention_activation: str = "dice",
        ffn_hidden: int | None = None,
        fused: bool = True,
        dice_eps: float = 1e-8,
        dice_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.max_sessions = max_sessions
        self.max_session_len = max_session_len
        self.gap_seconds = gap_seconds
        self.bias_encoding = BiasEncoding(max_sessions, max_session_len, dim)
        self.extractor = SessionInterestExtractor(dim, heads, ffn_hidden, fused=fused)
        self.interactor = SessionInterestInteractor(dim, lstm_hidden)
        self.interest_attention = SessionTargetAttention(
            dim, dim, attention_hidden, attention_activation, dice_eps, dice_momentum
        )
        self.state_attention = SessionTargetAttention(
            2 * lstm_hidden, dim, attention_hidden, attention_activation, dice_eps, dice_momentum
        )
        self.out_width = dim + 2 * lstm_hidden

    def forward_sessions(
        self,
        sessions: torch.Tensor,
        behaviour_mask: torch.Tensor,
        session_mask: torch.Tensor,
        candidates: torch.Tensor,
    ) -> DSINOutput:
        """From the dense block (as :func:`sessionize` returns it).

        Args:
            sessions: ``[B, K, L, D]``.
            behaviour_mask: ``[B, K, L]`` bool.
            session_mask: ``[B, K]`` bool, a prefix of each row.
            candidates: ``[B, D]``.
        """
        interests = self.extractor(self.bias_encoding(sessions), behaviour_mask)  # [B, K, D]
        states = self.interactor(interests, session_mask)  # [B, K, 2h]
        u_i, a_i = self.interest_attention(interests, session_mask, candidates)
        u_h, a_h = self.state_attention(states, session_mask, candidates)
        return DSINOutput(torch.cat([u_i, u_h], dim=-1), a_i, a_h, session_mask)

    def forward_detailed(
        self,
        behaviours: torch.Tensor,
        timestamps: torch.Tensor,
        lengths: torch.Tensor,
        candidates: torch.Tensor,
    ) -> DSINOutput:
        """:meth:`forward` with both attentions and the session mask."""
        sessions, behaviour_mask, session_mask = sessionize(
            behaviours, timestamps, lengths, self.gap_seconds, self.max_sessions, self.max_session_len
        )
        return self.forward_sessions(sessions, behaviour_mask, session_mask, candidates)

    def forward(
        self,
        behaviours: torch.Tensor,
        timestamps: torch.Tensor,
        lengths: torch.Tensor,
        candidates: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            behaviours: ``[N, D]`` jagged, sample after sample, oldest first.
            timestamps: ``[N]`` int64 unix seconds aligned with ``behaviours``.
            lengths: ``[B]``.
            candidates: ``[B, D]``.

        Returns:
            ``(interest [B, D + 2 * lstm_hidden], attention [B, K])``: the attention over the session
            interests (slot 0 = oldest kept session); a sample without history gives zeros for both.
        """
        out = self.forward_detailed(behaviours, timestamps, lengths, candidates)
        return out.interest, out.interest_attention
