"""Row gathers whose backward is a gather too.

``x.index_select(0, index)`` differentiates into ``index_add`` (a scatter-add into a zero tensor): for the
row permutations and subsets DIEN uses every batch (jagged <-> packed layout, the auxiliary loss's pairs),
that backward was 0.6-2.1 ms per call on ``[26k, 32]`` here, about 9x an ``index_select`` of the same rows
(random-order scatter-adds miss the cache). When every row is taken at most once, the backward is itself a
gather through the *inverse* index: ``grad_x[j] = grad_y[inverse[j]]``, with rows that were not taken reading
a zero row. :func:`gather_rows` is that; ``x.index_select(0, index)`` is its reference (tests compare values
and gradients).
"""

from __future__ import annotations

import torch


def inverse_index(index: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``[M]`` distinct rows of a ``[num_rows, ...]`` tensor -> ``[num_rows]`` the position of each row in
    ``index``, or ``M`` for rows not in it (which :func:`gather_rows` maps to a zero row)."""
    inverse = torch.full((num_rows,), index.numel(), dtype=torch.long, device=index.device)
    inverse[index] = torch.arange(index.numel(), device=index.device)
    return inverse


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        ctx.covers_all = index.numel() == x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        if not ctx.covers_all:
            grad = torch.cat([grad, grad.new_zeros(1, *grad.shape[1:])])
        return grad.index_select(0, inverse), None, None


def gather_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[index]`` along dim 0, for ``index`` without repeats, backward by gathering through ``inverse``.

    Args:
        x: ``[N, ...]``.
        index: ``[M]`` distinct row numbers (M <= N; M == N is a permutation).
        inverse: :func:`inverse_index` ``(index, N)``; for a permutation, any inverse permutation.

    Returns:
        ``[M, ...]``, equal to ``x.index_select(0, index)`` with the same gradient.
    """
    if inverse.numel() != x.shape[0]:
        raise ValueError(f"gather_rows: inverse has {inverse.numel()} entries, x has {x.shape[0]} rows")
    return _GatherRows.apply(x, index, inverse)
