"""Reusable masked attention blocks: scaled dot-product self-attention, multi-head self- and target
attention, and co-attention.

Masking convention (every function and module here): a mask is bool, True at real positions, False at
padding.

* Padded *keys* never receive weight: changing the values stored at padded positions changes nothing.
* Padded *queries* give zero output rows, so downstream pooling may sum without re-masking.
* A row whose keys are all padding (an empty sequence) gives zeros, never NaN, forward and backward:
  masked scores are filled with the dtype's most negative finite value rather than ``-inf`` (a fully
  masked row then softmaxes to a finite uniform row, which the mask multiplies to zero).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over the True positions of ``mask``; exactly 0 at False positions, rows without any True give
    zeros (not NaN).

    Args:
        scores: any shape.
        mask: bool, broadcastable to ``scores``.
        dim: the dimension normalised over.
    """
    filled = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=dim) * mask


def masked_scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    query_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T / sqrt(d)) v`` with masked keys (the plain, unfused formula).

    Args:
        q: ``[..., Tq, d]``.
        k: ``[..., Tk, d]``.
        v: ``[..., Tk, dv]``.
        key_mask: ``[..., Tk]`` bool (leading dims broadcastable to those of ``q``).
        query_mask: ``[..., Tq]`` bool or None; output rows of padded queries are zeroed.

    Returns:
        ``(out [..., Tq, dv], weights [..., Tq, Tk])``; weights are 0 at padded keys and padded queries.
    """
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    weights = masked_softmax(scores, key_mask.unsqueeze(-2))
    if query_mask is not None:
        weights = weights * query_mask.unsqueeze(-1)
    return weights @ v, weights


def scaled_dot_product_self_attention(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Parameter-free self-attention ``softmax(X X^T / sqrt(D)) X`` (Q = K = V = X), masked.

    Args:
        x: ``[B, T, D]``.
        mask: ``[B, T]`` bool, True at real positions.

    Returns:
        ``[B, T, D]``: each real position attends over the real positions of its row; padded positions and
        fully padded rows are zeros.
    """
    return masked_scaled_dot_product_attention(x, x, x, mask, mask)[0]


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention ``Concat(head_1..head_H) W^O`` with
    ``head_h = softmax(X W^Q_h (X W^K_h)^T / sqrt(D/H)) X W^V_h``, masked.

    Args:
        dim: D, the model width (input and output); must be divisible by ``heads``.
        heads: H.
        fused: use ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels
            where available); ``False`` runs the plain formula. Both have the masking semantics of this
            module (see the module docstring).

    Shapes: ``x [B, T, D], mask [B, T] bool -> [B, T, D]``, zero at padded positions (the output projection's
    bias included) and on fully padded rows.
    """

    def __init__(self, dim: int, heads: int, fused: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"MultiHeadSelfAttention: dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads, self.fused = dim, heads, fused
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.heads, self.dim // self.heads).transpose(1, 2)  # [B, H, T, dh]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        if self.fused:
            # Not every backend of the fused op returns finite values for a row whose keys are all masked
            # (older versions and some GPU kernels give NaN); let such rows attend everywhere (finite
            # garbage) and zero them below with the query mask.
            key_mask = mask | ~mask.any(dim=1, keepdim=True)
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        else:
            heads = masked_scaled_dot_product_attention(q, k, v, mask[:, None, :], mask[:, None, :])[0]
        out = self.o(heads.transpose(1, 2).reshape(b, t, self.dim))
        return out * mask.unsqueeze(-1)


class MultiHeadTargetAttention(nn.Module):
    """Multi-head attention from one query per sample (the candidate) over a sequence.

    ``head_h = softmax_t((c W^Q_h) . (s_t W^K_h) / sqrt(D/H)) s W^V_h``, ``out = Concat(head_h) W^O``.

    Args:
        dim: D, the width of the candidate, the sequence and the output; divisible by ``heads``.
        heads: H.

    Shapes: ``query [B, D], keys [B, T, D], mask [B, T] bool -> (out [B, D], weights [B, H, T])``. Weights
    are 0 at padded positions; a sample without any real position gives ``out = 0`` (not ``W^O``'s bias)
    and zero weights.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"MultiHeadTargetAttention: dim {dim} is not divisible by heads {heads}")
        self.dim, self.heads = dim, heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = keys.shape
        dh = self.dim // self.heads
        q = self.q(query).view(b, self.heads, 1, dh)
        k = self.k(keys).view(b, t, self.heads, dh).transpose(1, 2)
        v = self.v(keys).view(b, t, self.heads, dh).transpose(1, 2)
        heads, weights = masked_scaled_dot_product_attention(
            q, k, v, mask[:, None, :]
        )  # [B,H,1,dh]/[B,H,1,T]
        out = self.o(heads.reshape(b, self.dim)) * mask.any(dim=1, keepdim=True)
        return out, weights.squeeze(2)


class CoAttention(nn.Module):
    """Co-attention between two sequences: ``A = softmax(X1 W1 (X2 W2)^T)`` (softmax over X2's positions),
    ``X1' = A X2``, ``X2' = A^T X1``.

    Masks: a padded X2 position gets no weight in any row of A (column 0); a padded X1 position has a zero row
    of A, so it neither receives X1' (zeros) nor contributes to X2'. No ``1/sqrt(d)`` scaling: the formula
    as written (W1, W2 can learn any scale).

    Args:
        d1: width of X1.
        d2: width of X2.
        d: width of the shared space the two are projected into (W1: d1 -> d, W2: d2 -> d, no bias).

    Shapes: ``x1 [B, T1, d1], x2 [B, T2, d2], mask1 [B, T1], mask2 [B, T2] ->
    (x1' [B, T1, d2], x2' [B, T2, d1], A [B, T1, T2])``.
    """

    def __init__(self, d1: int, d2: int, d: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d1, d, bias=False)
        self.w2 = nn.Linear(d2, d, bias=False)

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, mask1: torch.Tensor, mask2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self.w1(x1) @ self.w2(x2).transpose(1, 2)  # [B, T1, T2]
        a = masked_softmax(scores, mask2.unsqueeze(1)) * mask1.unsqueeze(2)
        return a @ x2, a.transpose(1, 2) @ x1, a
