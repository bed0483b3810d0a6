"""Dice in training mode as one native CPU kernel, forward and backward (``dice_kernel.h``).

Why a hand-written kernel: Dice runs on every hidden layer of DIN's attention unit (and of DIEN's), on
``[N, H]`` activations of all N behaviours of a batch. Through ATen it is ~9 passes over ``[N, H]`` forward
and ~18 backward (batch norm, sigmoid, gate, products, sums, batch-norm backward), each costing ~0.2-0.5 ns
per element here whether or not the tensor fits in cache; the kernel makes 2 passes each way, keeping only
the float32 sigmoid for the backward (Dice forward + backward on ``[26k, 80]``: ~2.5-3 ms vs ~7-8 ms,
docs/benchmarks.md). TorchInductor (``training.compile``) fuses the same passes but compiles per model and pays
it in every job; this kernel is built once per machine (:mod:`din_torchrec.ops.native`). Where it cannot run
(GPU, other dtypes, no compiler, under ``torch.compile``) Dice takes its ATen path
(:meth:`~din_torchrec.modules.activations.Dice.forward`).
"""

from __future__ import annotations

import torch

from din_torchrec.ops import native


def usable(x: torch.Tensor) -> bool:
    """Whether :func:`dice_train` can run on ``x``: a CPU float32/bfloat16 tensor, the kernels built."""
    return native.usable(x, (torch.float32, torch.bfloat16))


class _FusedDice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, eps: float):  # type: ignore[override]
        mod = native.kernels()
        assert mod is not None
        a = alpha.detach().float().contiguous()
        out, mean, var, invstd, prob = mod.dice_forward(x, a, eps)
        ctx.save_for_backward(x, prob, mean, invstd, a)
        ctx.alpha_dtype = alpha.dtype
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _gm: torch.Tensor, _gv: torch.Tensor):  # type: ignore[override]
        x, prob, mean, invstd, a = ctx.saved_tensors
        mod = native.kernels()
        assert mod is not None
        grad_x, grad_alpha = mod.dice_backward(grad.contiguous(), x, prob, mean, invstd, a)
        return grad_x, grad_alpha.to(ctx.alpha_dtype), None


def dice_train(
    x: torch.Tensor, alpha: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dice in training mode on ``x: [N, H]`` (N > 0) with batch statistics.

    Returns:
        ``(out [N, H] in x's dtype, mean [H], var [H])``: the batch mean and biased variance (float32) for
        the running estimates. Gradients flow to ``x`` and ``alpha``.
    """
    return _FusedDice.apply(x.contiguous(), alpha, eps)
