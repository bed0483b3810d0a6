"""Activations used by the DIN family: Dice (data-adaptive PReLU) and a factory by name."""

from __future__ import annotations

import torch
from torch import nn


class Dice(nn.Module):
    """Dice activation (DIN paper, eq. 8): ``f(s) = p(s) * s + (1 - p(s)) * alpha * s`` with
    ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))``.

    In training E[s] and Var[s] are the statistics of the current mini-batch (per hidden unit, over every
    leading dim) and update running estimates; in eval the running estimates are used, like batch norm.

    Args:
        num_features: H, the size of the last dim.
        eps: added to the variance.
        momentum: weight of the new batch in the running estimates.

    Shapes: ``x: [..., H] -> [..., H]``.
    """

    def __init__(self, num_features: int, eps: float = 1e-8, momentum: float = 0.01) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.alpha = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.num_features)
        if self.training and flat.shape[0] > 0:
            # mean(x) and mean(x^2) instead of var_mean: var_mean over dim 0 is ~30x slower on CPU here.
            mean = flat.mean(0)
            var = (flat * flat).mean(0) - mean * mean
            with torch.no_grad():
                # Under bf16 autocast the batch statistics are bf16; the running buffers stay fp32.
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((x - mean) * torch.rsqrt(var.clamp_min(0) + self.eps))
        return x * (p + (1 - p) * self.alpha)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


def make_activation(
    name: str, num_features: int, dice_eps: float = 1e-8, dice_momentum: float = 0.01
) -> nn.Module:
    """An activation module by config name: ``dice``, ``prelu`` (one slope per unit), ``relu``, ``sigmoid``."""
    if name == "dice":
        return Dice(num_features, eps=dice_eps, momentum=dice_momentum)
    if name == "prelu":
        return nn.PReLU(num_features, init=0.25)
    if name == "relu":
        return nn.ReLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"activation: expected one of dice, prelu, relu, sigmoid; got {name!r}")
