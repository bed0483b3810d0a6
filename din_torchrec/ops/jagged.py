"""Jagged row operations of DIN's target attention, each a native CPU kernel (``jagged_kernel.h``) beside its
plain PyTorch reference, which also runs wherever the kernel cannot (GPU, float64, no compiler, compile).

* :func:`product_features`: ``[b, b * c[seg]]``, the behaviour side of the local activation unit's split
  first layer (:meth:`~din_torchrec.modules.attention.LocalActivationUnit.scores_jagged`);
* :func:`weighted_segment_sum`: ``p[s] = sum_{n in s} w[n] b[n]``, the attention pooling;
* :func:`first_layer`: the unit's whole first layer ``A b + P (b * c[seg]) + k[seg]`` in float32, as a
  per-sample weight matrix (``lau_kernel.h``).

Why kernels: in ATen these are 3-4 passes over ``[N, D]`` each way (gather, product, concatenation, cast;
scatter-add backward), and with N = 26k-106k behaviours per batch each pass costs about as much as the
arithmetic; the kernels make one pass each way (docs/benchmarks.md, section 7).
"""

from __future__ import annotations

import torch

from din_torchrec.modules.mlp import row_bucketed
from din_torchrec.ops import native
from din_torchrec.ops.linear import linear, native_linear_dtype


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


def first_layer_reference(
    b: torch.Tensor, c: torch.Tensor, seg: torch.Tensor, a: torch.Tensor, p: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """``z[n] = A b[n] + P (b[n] * c[seg[n]]) + k[seg[n]]`` as one matmul on ``[b, b * c[seg]]``.

    ``b: [N, D]``, ``c: [B, D]``, ``seg: [N]``, ``a, p: [H, D]``, ``k: [B, H]`` -> ``[N, H]``. Under bf16 on the
    CPU the matmul's rows are padded to a bucket: a bounded set of matmul shapes (``mlp.ROW_BUCKET``)."""
    w = torch.cat([a, p], dim=1).t()
    return row_bucketed(
        lambda v, rows: torch.addmm(rows, v, w), product_features(b, c, seg), k.index_select(0, seg)
    )


class _FirstLayer(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        b: torch.Tensor,
        c: torch.Tensor,
        seg: torch.Tensor,
        a: torch.Tensor,
        p: torch.Tensor,
        k: torch.Tensor,
    ) -> torch.Tensor:
        a_t, p_t = a.t().contiguous(), p.t().contiguous()
        z = native.kernels().lau_first_forward(b, c, seg, a_t, p_t, k)  # type: ignore[union-attr]
        if z is None:
            raise RuntimeError("first_layer: rows must come sample after sample (seg non-decreasing)")
        ctx.save_for_backward(b, c, seg, a_t, p_t)
        return z

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        b, c, seg, a_t, p_t = ctx.saved_tensors
        db, dc, da_t, dp_t, dk = native.kernels().lau_first_backward(grad.contiguous(), b, c, seg, a_t, p_t)  # type: ignore[union-attr]
        return db, dc, None, da_t.t(), dp_t.t(), dk


#: The per-sample matrix costs D * H to build, as much as one row's product: below this many rows per sample
#: (N / B) the matmul wins. Measured, forward + backward, D = 32, H = 80, one thread: 1 row 0.42x the matmul's
#: speed, 2 rows 0.61x, 4 rows 0.95x, 8 rows 1.7x, 25 rows 1.9x (D = 256, H = 256: 4 rows 0.63x, 25 rows 1.8x).
MIN_ROWS_PER_SAMPLE = 6


def first_layer_native(b: torch.Tensor, c: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`first_layer` runs its kernel on these inputs: float32 on the CPU, outside autocast and
    compile, with the extension built (under bf16 the ``[N, 2D]`` matmul on AVX512-BF16 is faster), and at
    least :data:`MIN_ROWS_PER_SAMPLE` rows per sample on average."""
    return (
        native.usable(b)
        and c.dtype == torch.float32
        and k.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and b.shape[0] > 0
        and b.shape[0] >= MIN_ROWS_PER_SAMPLE * c.shape[0]
    )


def first_layer(
    b: torch.Tensor, c: torch.Tensor, seg: torch.Tensor, a: torch.Tensor, p: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """:func:`first_layer_reference`; where :func:`first_layer_native` and with rows sample after sample (``seg``
    non-decreasing, as :func:`~din_torchrec.modules.attention.segment_ids` gives), one native kernel with a
    per-sample weight matrix ``M_s = A + P diag(c_s)``: half the multiply-adds of the ``[N, 2D]`` matmul
    (``lau_kernel.h``; 1.9x forward, 2.1x backward on ``[25.6k, 32] -> 80`` here)."""
    if (
        first_layer_native(b, c, k)
        and a.dtype == p.dtype == torch.float32
        and bool((seg[1:] >= seg[:-1]).all())
    ):
        return _FirstLayer.apply(b.contiguous(), c.contiguous(), seg.contiguous(), a, p, k.contiguous())
    w = torch.cat([a, p], dim=1)
    if native_linear_dtype(b, w) == torch.bfloat16:
        # bf16 on the CPU: the same product through the BRGEMM linear kernel, k[seg] added before its one
        # rounding (as addmm's accumulator) -- read by index inside the kernel, its gradient summed per sample
        # there (no [N, H] gather, no index_add) -- without padding the rows to a bucket.
        return linear(product_features(b, c, seg), w, None, add=k, add_index=seg)
    return first_layer_reference(b, c, seg, a, p, k)


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
