"""``F.linear`` on the CPU through oneDNN's BRGEMM micro-kernel (``linear_kernel.h``), in float32 and under bf16
autocast.

Why, float32: ATen sends a float32 matmul to MKL, and MKL runs its AVX2 code on AMD CPUs: ~100 GFLOP/s on one
core of this project's Zen 5 machine, against ~250 GFLOP/s for oneDNN's BRGEMM (which picks its code by
instruction set, not vendor) on the same shapes (``small_gemm.h`` has the figures).

Why, bf16: under autocast ATen's bf16 matmul is oneDNN's matmul primitive, built and cached per shape, so the
models pad jagged row counts to buckets (:data:`~din_torchrec.modules.mlp.ROW_BUCKET`), and the padding, its
zero fill and the slice-back of the gradient are memory passes as long as the product. The kernel runs fixed
row blocks (the last one padded inside it): no padding outside, one micro-kernel per layer shape. It computes
what autocast's ``F.linear`` does -- bf16 operands, float32 sums, a bf16 output -- except that the bias is added
in float32 before the output's one rounding (autocast rounds the bias to bf16 first), and the weight's and
bias's gradients are summed and returned in float32.

Everywhere else -- GPUs, float64, a bf16 model outside autocast, compile and tracing -- :func:`linear` is
``F.linear``, which is also the reference the kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from din_torchrec.ops import native


class _NativeLinear(torch.autograd.Function):
    """``x: [X, I]`` (float32; or bf16 for the bf16 kernel, which also reads float32 and rounds it block by
    block), ``weight: [O, I]``, ``bias: [O]`` or None, ``add`` or None (bf16 only: added in float32 before the
    output's rounding): ``[M, O]``, or with ``add_index: [M]`` int64 any ``[S, O]`` whose row ``add_index[r]``
    goes to output row ``r``; ``rows: [M]`` distinct int64 or None (bf16 only): the product of ``x[rows]``,
    its gradient scattered back to those rows of ``x``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        add: torch.Tensor | None,
        add_index: torch.Tensor | None,
        rows: torch.Tensor | None,
        compute_bf16: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight, add_index, rows)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.add_dtype = None if add is None else add.dtype
        ctx.add_rows = 0 if add is None else add.shape[0]
        ctx.compute = torch.bfloat16 if compute_bf16 else torch.float32
        return native.kernels().linear_forward(  # type: ignore[union-attr]
            x, weight, bias, add, add_index, rows, compute_bf16
        )

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight, add_index, rows = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dadd = ctx.needs_input_grad[:4]
        need_db = need_db and ctx.bias_dtype is not None
        need_dadd = need_dadd and ctx.add_dtype is not None
        grad = grad.to(ctx.compute)
        dx, dw, db, dadd = native.kernels().linear_backward(  # type: ignore[union-attr]
            grad, x, weight, need_dx, need_dw, need_db, add_index if need_dadd else None, ctx.add_rows, rows
        )
        if need_dadd:
            # Row-aligned add: its gradient is grad itself; indexed: grad's rows summed per index (the kernel).
            dadd = (grad if add_index is None else dadd).to(ctx.add_dtype)
        return (
            dx if need_dx else None,
            dw.to(weight.dtype) if need_dw else None,
            db.to(ctx.bias_dtype) if need_db else None,
            dadd if need_dadd else None,
            None,
            None,
            None,
        )


def native_linear_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype | None:
    """The compute type :func:`linear` runs its kernel in for these operands (float32, or bf16 under CPU bf16
    autocast), or ``None`` for ``F.linear``."""
    if x.dim() != 2 or weight.dim() != 2 or not native.usable(x, (torch.float32, torch.bfloat16)):
        return None
    if torch.is_autocast_enabled("cpu"):
        if torch.get_autocast_dtype("cpu") == torch.bfloat16 and weight.dtype in (
            torch.float32,
            torch.bfloat16,
        ):
            return torch.bfloat16
        return None
    return torch.float32 if x.dtype == weight.dtype == torch.float32 else None


def native_linear_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes the native path for these operands."""
    return native_linear_dtype(x, weight) is not None


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
    add_index: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x[rows] @ weight.T + bias (+ add)``: ``x: [X, I]``, ``rows: [M]`` distinct row numbers (None: all of
    ``x``, M = X), ``weight: [O, I]``, ``bias: [O]``, ``add: [M, O]`` -- or ``[S, O]`` with ``add_index: [M]``
    int64, meaning ``add[add_index]`` (e.g. a per-sample term spread over each sample's jagged rows) -> ``[M,
    O]`` (bf16 under CPU bf16 autocast, as ``F.linear`` / ``addmm`` there). Under bf16 the kernel reads the
    rows by index and rounds float32 ``x`` block by block instead of a gathered copy and a cast of all of it,
    and sums ``add``'s gradient per index and scatters ``x``'s back to ``rows`` itself."""
    if add is None and add_index is not None:
        raise ValueError("linear: add_index given without add")
    dtype = native_linear_dtype(x, weight)
    if dtype == torch.bfloat16 and weight.shape[0] > 1:
        if add is not None and add.dtype not in (torch.float32, torch.bfloat16):
            add = add.float()
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.to(dtype)
        return _NativeLinear.apply(x, weight, bias, add, add_index, rows, True)
    if rows is not None:
        x = x.index_select(0, rows)
    if dtype == torch.bfloat16:  # one output: the kernel's dot-product path, on bf16 rows
        return _NativeLinear.apply(x.to(dtype), weight, bias, add, add_index, None, True)
    if add is not None and add_index is not None:
        add = add.index_select(0, add_index)
    if dtype == torch.float32:
        y = _NativeLinear.apply(x, weight, bias, None, None, None, False)
        return y if add is None else y + add
    if add is None:
        return F.linear(x, weight, bias)
    return torch.addmm(add, x, weight.t()) if bias is None else torch.addmm(add + bias, x, weight.t())
