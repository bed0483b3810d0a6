"""``F.linear`` for float32 on the CPU through oneDNN's BRGEMM micro-kernel (``linear_kernel.h``).

Why: ATen sends a float32 matmul to MKL, and MKL runs its AVX2 code on AMD CPUs: ~100 GFLOP/s on one core of
this project's Zen 5 machine, against ~250 GFLOP/s for oneDNN's BRGEMM (which picks its code by instruction
set, not vendor) on the same shapes (``small_gemm.h`` has the figures). Everywhere else -- bf16 / autocast
(already oneDNN), GPUs, float64, compile and tracing -- :func:`linear` is ``F.linear``, which is also the
reference the kernel is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from din_torchrec.ops import native


class _NativeLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return native.kernels().linear_forward(x, weight, bias)  # type: ignore[union-attr]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad
        dx = dw = None
        if need_dx or need_dw:
            dx, dw = native.kernels().linear_backward(grad, x, weight, need_dx, need_dw)  # type: ignore[union-attr]
        db = grad.sum(0) if ctx.has_bias and need_db else None
        return (dx if need_dx else None), (dw if need_dw else None), db


def native_linear_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes the native path for these operands."""
    return (
        x.dim() == 2
        and weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and native.usable(x)
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``: ``x: [M, I]``, ``weight: [O, I]``, ``bias: [O]`` -> ``[M, O]``."""
    if native_linear_usable(x, weight):
        return _NativeLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)
