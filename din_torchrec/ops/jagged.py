"""Jagged row operations of DIN's target attention, each a native CPU kernel (``jagged_kernel.h``) beside its
plain PyTorch reference, which also runs wherever the kernel cannot (GPU, float64, no compiler, compile).

* :func:`product_features`: ``[b, b * c[seg]]``, the behaviour side of the local activation unit's split
  first layer (:meth:`~din_torchrec.modules.attention.LocalActivationUnit.scores_jagged`);
* :func:`weighted_segment_sum`: ``p[s] = sum_{n in s} w[n] b[n]``, the attention pooling.

Why kernels: in ATen these are 3-4 passes over ``[N, D]`` each way (gather, product, concatenation, cast;
scatter-add backward), and with N = 26k-106k behaviours per batch each pass costs about as much as the
arithmetic; the kernels make one pass each way (docs/benchmarks.md, section 7).
"""

from __future__ import annotations

import torch

from din_torchrec.ops import native


def product_features_reference(b: torch.Tensor, c: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """``b: [N, D]``, ``c: [B, D]``, ``seg: [N]`` -> ``[N, 2D]`` = ``[b, b * c[seg]]``."""
    return torch.cat([b, b * c.index_select(0, seg)], dim=1)


def weighted_segment_sum_reference(
    b: torch.Tensor, w: torch.Tensor, seg: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """``b: [N, D]``, ``w: [N]``, ``seg: [N]`` -> ``[num_segments, D]``; empty segments give zero rows."""
    rows = b * w.unsqueeze(-1)
    return rows.new_zeros(num_segments, b.shape[1]).index_add(0, seg, rows)


class _ProductFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, b: torch.Tensor, c: torch.Tensor, seg: torch.Tensor, bf16_out: bool) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(b, c, seg)
        return native.kernels().product_features(b, c, seg, bf16_out)  # type: ignore[union-attr]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        b, c, seg = ctx.saved_tensors
        gb, gc = native.kernels().product_features_backward(grad.contiguous(), b, c, seg)  # type: ignore[union-attr]
        return gb, gc, None, None


class _WeightedSegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, b: torch.Tensor, w: torch.Tensor, seg: torch.Tensor, num_segments: int) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(b, w, seg)
        return native.kernels().weighted_segment_sum(b, w, seg, num_segments)  # type: ignore[union-attr]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        b, w, seg = ctx.saved_tensors
        gb, gw = native.kernels().weighted_segment_sum_backward(grad.contiguous(), b, w, seg)  # type: ignore[union-attr]
        return gb, gw, None, None


def product_features(b: torch.Tensor, c: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """``[b, b * c[seg]]`` (:func:`product_features_reference`); under bf16 autocast on the CPU the kernel
    writes it in bf16 directly (the values autocast's cast of the float32 result would give)."""
    if not (native.usable(b) and c.dtype in (torch.float32, torch.bfloat16)):
        return product_features_reference(b, c, seg)
    bf16_out = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    # A bf16 c (DIEN's candidate projection under autocast) is exact in float32: the reference's float32
    # product of the float32 b with it gives the same values; its gradient returns to bf16 through the cast.
    return _ProductFeatures.apply(b.contiguous(), c.float().contiguous(), seg.contiguous(), bf16_out)


def weighted_segment_sum(
    b: torch.Tensor, w: torch.Tensor, seg: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """:func:`weighted_segment_sum_reference` in one pass each way (float32 result; ``w`` float32 or bf16)."""
    if not (native.usable(b) and w.dtype in (torch.float32, torch.bfloat16)):
        return weighted_segment_sum_reference(b, w, seg, num_segments)
    return _WeightedSegmentSum.apply(b.contiguous(), w.contiguous(), seg.contiguous(), num_segments)
