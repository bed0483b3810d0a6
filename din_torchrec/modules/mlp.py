"""Multi-layer perceptron with configurable activations."""

from __future__ import annotations

import torch
from torch import nn

from din_torchrec.modules.activations import apply_reference, make_activation
from din_torchrec.ops.linear import linear, native_linear_usable

# Row counts of jagged activations (N behaviours per batch) change every batch. Under bf16 autocast on the
# CPU, matmuls run through oneDNN, which builds (JIT-compiles) and caches a primitive per shape: each new row
# count cost ~1.5 ms more per matmul and ~0.5 MiB of memory that is kept (measured: 1,500 shapes grew the
# process by 800 MiB; a DIN training in bf16 peaked at 2.6 GB against 1.3 GB in fp32, and its epochs were no
# faster than fp32's although its steps, timed on repeated batches, were 1.4-1.6x). Padding the rows of a
# matmul's input to a multiple of ROW_BUCKET bounds the number of shapes; the padded rows are sliced off right
# after the product, so nothing downstream (Dice's batch statistics included) ever sees them.
ROW_BUCKET = 1024


def needs_row_buckets(x: torch.Tensor) -> bool:
    """Whether a matmul on ``x`` goes through oneDNN's per-shape primitives: bf16 on the CPU."""
    if x.device.type != "cpu" or x.shape[0] <= ROW_BUCKET:
        return False
    return x.dtype == torch.bfloat16 or torch.is_autocast_enabled("cpu")


def row_bucketed(fn, x: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """``fn(x, *more)`` for a row-wise ``fn`` (a linear layer, an ``addmm`` on rows) of row-aligned 2-D
    tensors, computed on them padded with zero rows to a multiple of :data:`ROW_BUCKET` when
    :func:`needs_row_buckets`; same values and gradients."""
    if not needs_row_buckets(x):
        return fn(x, *more)
    n = x.shape[0]
    pad = (-n) % ROW_BUCKET
    if pad == 0:
        return fn(x, *more)
    padded = [torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (x, *more)]
    return fn(*padded)[:n]


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` on rows ``x: [N, I]``: on the CPU, in float32 and under bf16 autocast, through the native
    kernel (:func:`~din_torchrec.ops.linear.linear`: oneDNN's BRGEMM in fixed row blocks -- instead of MKL's
    AVX2 sgemm on AMD CPUs, and of padding bf16 rows to buckets); otherwise ``F.linear``, its rows padded to
    buckets where :func:`needs_row_buckets`."""
    if native_linear_usable(x, weight):
        return linear(x, weight, bias)
    return row_bucketed(lambda v: torch.nn.functional.linear(v, weight, bias), x)


class MLP(nn.Module):
    """``Linear -> activation`` per hidden size, then an optional linear output layer.

    Args:
        in_features: input width I.
        hidden: hidden widths ``[H1, H2, ...]``.
        activation: name for :func:`make_activation`.
        out_features: width of a final linear layer without activation; ``None`` for no output layer.

    Shapes: ``x: [N, I] -> [N, out_features or H_last]``.
    """

    def __init__(
        self,
        in_features: int,
        hidden: list[int],
        activation: str = "relu",
        out_features: int | None = 1,
        dice_eps: float = 1e-8,
        dice_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers.append(nn.Linear(width, h))
            layers.append(make_activation(activation, h, dice_eps, dice_momentum))
            width = h
        if out_features is not None:
            layers.append(nn.Linear(width, out_features))
            width = out_features
        self.layers = nn.Sequential(*layers)
        self.out_width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(x, 0)

    def forward_from(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """The layers from ``self.layers[start]`` on (a caller that computed the first ones itself, e.g. a
        split first layer, continues here)."""
        for layer in self.layers[start:]:
            x = linear_rows(x, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer(x)
        return x

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with every Dice through its plain formula (a reference for tests and benchmarks)."""
        for layer in self.layers:
            x = apply_reference(layer, x)
        return x
