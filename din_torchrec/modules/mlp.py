"""Multi-layer perceptron with configurable activations."""

from __future__ import annotations

import torch
from torch import nn

from din_torchrec.modules.activations import apply_reference, make_activation


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
        return self.layers(x)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with every Dice through its plain formula (a reference for tests and benchmarks)."""
        for layer in self.layers:
            x = apply_reference(layer, x)
        return x
