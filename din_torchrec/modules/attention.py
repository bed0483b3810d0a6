"""DIN target attention: the local activation unit and attention pooling over a behaviour sequence.

Two paths compute the same thing:

* the *reference* (``*_padded``, ``scores_reference``): the formula as written, on a padded ``[B, T, D]``
  block with a mask, scoring ``[b, c, b - c, b * c]`` through an MLP with Dice's plain formula;
* the *fast path* (jagged, ``forward``): only the N real behaviours of the batch are touched (no padding),
  and the first layer is split algebraically,
  ``W [b, c, b-c, b*c] = (W_b + W_d) b + (W_c - W_d) c + W_p (b*c)``,
  so the candidate-side product is computed once per sample (B rows), not once per behaviour (N rows), and
  the behaviour side is one ``[N, 2D] x [2D, H]`` matmul on ``[b, b*c]``; on the CPU ``[b, b*c]``, the
  pooling (:mod:`din_torchrec.ops.jagged`) and Dice (:mod:`din_torchrec.ops.fused_dice`) are native kernels
  of one or two passes each way, elsewhere their PyTorch references.

Tests check the fast path against the reference on random jagged inputs, empty and length-1 histories
included.
"""

from __future__ import annotations

import torch
from torch import nn

from din_torchrec.modules.activations import apply_reference, make_activation
from din_torchrec.modules.mlp import MLP
from din_torchrec.ops.jagged import first_layer, weighted_segment_sum
from din_torchrec.ops.linear import linear


def segment_ids(lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` lengths -> ``[N]`` the sample index of every jagged value (N = lengths.sum())."""
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)


def complete_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """``[B]`` lengths -> ``[B + 1]`` offsets starting at 0.

    Plain torch rather than ``fbgemm.asynchronous_complete_cumsum`` so this module imports on GPU machines
    without FBGEMM (the GPU check runs it with stock PyTorch); likewise :func:`segment_softmax` instead of
    ``fbgemm.jagged_softmax``, which also lacks a float64 CPU kernel.
    """
    return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])


def segment_softmax(scores: torch.Tensor, segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Softmax of ``scores [N]`` within each segment (``segments [N]``, sorted or not) -> ``[N]``.

    Plain torch (any dtype; fbgemm's ``jagged_softmax`` has no float64 CPU kernel). The per-segment max is
    subtracted for stability and detached: softmax is shift-invariant, so the gradient is unchanged.
    """
    seg_max = scores.new_full((num_segments,), float("-inf"))
    seg_max = seg_max.scatter_reduce(0, segments, scores.detach(), "amax", include_self=True)
    e = torch.exp(scores - seg_max.index_select(0, segments))
    return e / e.new_zeros(num_segments).index_add(0, segments, e).index_select(0, segments)


class LocalActivationUnit(nn.Module):
    """Scores each behaviour b against the candidate c with an MLP on ``[b, c, b - c, b * c]``.

    Args:
        embedding_dim: D, the width of a behaviour (and candidate) embedding.
        hidden: hidden widths of the scoring MLP, e.g. ``[80, 40]``; the output is one score.
        activation: ``dice``, ``prelu``, ``relu`` or ``sigmoid`` (the DIN paper's unit uses PReLU/Dice).
    """

    def __init__(
        self,
        embedding_dim: int,
        hidden: list[int],
        activation: str = "dice",
        dice_eps: float = 1e-8,
        dice_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("LocalActivationUnit: hidden must name at least one layer")
        self.embedding_dim = embedding_dim
        self.first = nn.Linear(4 * embedding_dim, hidden[0])
        self.first_activation = make_activation(activation, hidden[0], dice_eps, dice_momentum)
        self.rest = MLP(
            hidden[0], hidden[1:], activation, out_features=1, dice_eps=dice_eps, dice_momentum=dice_momentum
        )

    def scores_reference(self, behaviours: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Plain formula on aligned rows.

        Args:
            behaviours: ``[M, D]``.
            candidates: ``[M, D]``, the candidate of each behaviour's sample.

        Returns:
            ``[M]`` scores.
        """
        x = torch.cat([behaviours, candidates, behaviours - candidates, behaviours * candidates], dim=-1)
        h = apply_reference(self.first_activation, self.first(x))
        return self.rest.forward_reference(h).squeeze(-1)

    def scores_jagged(
        self, behaviours: torch.Tensor, candidates: torch.Tensor, segments: torch.Tensor
    ) -> torch.Tensor:
        """Fast path with the split first layer.

        Args:
            behaviours: ``[N, D]`` the real behaviours of the batch, sample after sample.
            candidates: ``[B, D]`` one candidate per sample.
            segments: ``[N]`` sample index of each behaviour (:func:`segment_ids`).

        Returns:
            ``[N]`` scores, equal to :meth:`scores_reference` on ``candidates[segments]``.
        """
        w_b, w_c, w_d, w_p = self.first.weight.split(self.embedding_dim, dim=1)
        # Candidate side once per sample: (W_c - W_d) c + bias, [B, H] -- through the linear kernel where it runs
        # (under bf16 autocast addmm's oneDNN call took 0.17 ms forward and 0.22 backward for [1024, 32] -> 80).
        cand_part = linear(candidates, w_c - w_d, self.first.bias)
        # Behaviour side [b, b*c] @ [W_b + W_d; W_p]^T plus the candidate rows: one matmul, or in float32 on
        # the CPU a per-sample weight matrix W_b + W_d + W_p diag(c_s) in one native kernel (ops/jagged.py).
        h = first_layer(behaviours, candidates, segments, w_b + w_d, w_p, cand_part)
        return self.rest(self.first_activation(h)).squeeze(-1)


class TargetAttentionPooling(nn.Module):
    """DIN's attention pooling: ``v_u = sum_j a_j e_{b_j}`` with ``a_j`` from a :class:`LocalActivationUnit`.

    ``normalization="none"`` keeps the unit's raw outputs as weights, as the DIN paper does (the sum of the
    weights then carries the intensity of the user's interest); ``"softmax"`` normalises them over each
    sample's real behaviours.
    """

    def __init__(
        self,
        embedding_dim: int,
        hidden: list[int],
        activation: str = "dice",
        normalization: str = "none",
        dice_eps: float = 1e-8,
        dice_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        if normalization not in ("none", "softmax"):
            raise ValueError(f"attention normalization: expected 'none' or 'softmax', got {normalization!r}")
        self.normalization = normalization
        self.unit = LocalActivationUnit(embedding_dim, hidden, activation, dice_eps, dice_momentum)

    def forward(
        self, behaviours: torch.Tensor, lengths: torch.Tensor, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Jagged fast path.

        Args:
            behaviours: ``[N, D]`` jagged values (sample after sample, no padding).
            lengths: ``[B]`` behaviours per sample (0 allowed).
            candidates: ``[B, D]``.

        Returns:
            ``(pooled [B, D], weights [N])``; a sample without behaviours pools to zeros.
        """
        segments = segment_ids(lengths)
        scores = self.unit.scores_jagged(behaviours, candidates, segments)
        if self.normalization == "softmax":
            weights = segment_softmax(scores, segments, lengths.numel())
        else:
            weights = scores
        pooled = weighted_segment_sum(behaviours, weights, segments, lengths.numel()).to(candidates.dtype)
        return pooled, weights

    def forward_padded(
        self, behaviours: torch.Tensor, mask: torch.Tensor, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference on a padded block.

        Args:
            behaviours: ``[B, T, D]``, padded.
            mask: ``[B, T]`` bool, True at real behaviours.
            candidates: ``[B, D]``.

        Returns:
            ``(pooled [B, D], weights [B, T])`` with zero weight at padded positions.
        """
        b, t, d = behaviours.shape
        cand = candidates.unsqueeze(1).expand(b, t, d)
        # Score only the real positions: Dice's batch statistics must not see padding.
        real_scores = self.unit.scores_reference(behaviours[mask], cand[mask])
        scores = real_scores.new_zeros(b, t).masked_scatter(mask, real_scores)
        if self.normalization == "softmax":
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
            weights = torch.nan_to_num(weights, nan=0.0)  # rows without any behaviour
        else:
            weights = scores * mask
        pooled = (weights.unsqueeze(-1) * behaviours).sum(1)
        return pooled, weights
