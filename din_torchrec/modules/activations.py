"""Activations used by the DIN family: Dice (data-adaptive PReLU) and a factory by name."""

from __future__ import annotations

import torch
from torch import nn

from din_torchrec.ops import fused_dice


class DiceGate(torch.autograd.Function):
    """``x * (alpha + (1 - alpha) * sigmoid(z))`` with the backward written out.

    Autograd's chain of sigmoid, lerp and mul makes several more passes over ``[M, H]`` (and keeps more
    intermediates) than these; checked against autograd with ``gradcheck`` in the tests.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        p = torch.sigmoid(z)
        one_minus_alpha = 1 - alpha
        if alpha.dtype in (torch.bfloat16, torch.float16):
            # Same values (ATen computes a reduced-precision addcmul in fp32 and rounds once), 1.8x faster on
            # the CPU here: its broadcast of a bf16 [H] vector over [N, H] is a slow path.
            a32 = alpha.float()
            gate = torch.addcmul(a32, p, one_minus_alpha.float()).to(p.dtype)
        else:
            gate = torch.addcmul(alpha, p, one_minus_alpha)
        ctx.save_for_backward(x, p, gate, one_minus_alpha)
        return x * gate

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, p, gate, one_minus_alpha = ctx.saved_tensors
        grad_x = grad * gate
        t = grad * x  # d out / d gate
        q = t.addcmul_(t, p, value=-1)  # t (1 - p), in place: t is not needed again
        grad_alpha = q.sum(0)
        grad_z = q.mul_(p).mul_(one_minus_alpha)  # t (1 - p) p (1 - alpha)
        return grad_x, grad_z, grad_alpha


# Below this many rows the fused path gains nothing, and a unit of (almost) zero batch variance is
# ill-conditioned (1/sqrt(eps) amplifies rounding): the formula then gives bit-for-bit the reference's values.
_FUSED_MIN_ROWS = 32


class Dice(nn.Module):
    """Dice activation (DIN paper, eq. 8): ``f(s) = p(s) * s + (1 - p(s)) * alpha * s`` with
    ``p(s) = sigmoid((s - E[s]) / sqrt(Var[s] + eps))``.

    In training E[s] and Var[s] are the statistics of the current mini-batch (per hidden unit, over every
    leading dim, biased variance) and update running estimates by ``lerp(momentum)``; in eval the running
    estimates are used, like batch norm.

    :meth:`forward` runs the native CPU kernel of :mod:`din_torchrec.ops.fused_dice` in training mode when
    it is built (two passes each way); otherwise (a GPU, no C++ compiler, ``training.native_kernels: false``) it
    normalises with ATen's batch-norm kernel (statistics and normalisation in one pass, a fused backward)
    and gates with :class:`DiceGate`. :meth:`forward_reference` is the formula as written. Same values, running estimates and gradients (tests compare them).

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
        if not self.training or flat.shape[0] < _FUSED_MIN_ROWS:
            return self.forward_reference(x)
        if fused_dice.usable(flat):
            return self.forward_native(x)
        return self.forward_aten(x)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        """Training mode through the native CPU kernel (ops/dice_kernel.h): 2 passes over ``[N, H]`` each way
        instead of ATen's ~9 / ~18."""
        out, mean, var = fused_dice.dice_train(x.reshape(-1, self.num_features), self.alpha, self.eps)
        self._track(mean, var)
        return out.view(x.shape)

    def forward_aten(self, x: torch.Tensor) -> torch.Tensor:
        """Training mode through ATen's batch-norm kernel and :class:`DiceGate` (GPU, no compiler, compile)."""
        flat = x.reshape(-1, self.num_features)
        # native_batch_norm returns the normalised input, the batch mean and 1/sqrt(var + eps).
        z, mean, invstd = torch.ops.aten.native_batch_norm(flat, None, None, None, None, True, 0.0, self.eps)
        with torch.no_grad():
            self._track(
                mean, invstd.to(self.running_var.dtype).pow(-2) - self.eps
            )  # the biased batch variance
        out = DiceGate.apply(flat, z.to(flat.dtype), self.alpha.to(flat.dtype))
        return out.view(x.shape)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Moves the running estimates towards a batch's mean and biased variance by ``lerp(momentum)``. Under
        bf16 autocast the batch statistics may be bf16; the running buffers stay fp32."""
        self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
        self.running_var.lerp_(var.detach().to(self.running_var.dtype), self.momentum)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The formula, term by term (and the eval / few-rows path of :meth:`forward`)."""
        flat = x.reshape(-1, self.num_features)
        if self.training and flat.shape[0] > 0:
            # mean(x) and mean(x^2) instead of var_mean: var_mean over dim 0 is ~30x slower on CPU here.
            mean = flat.mean(0)
            var = (flat * flat).mean(0) - mean * mean
            self._track(mean, var)
        else:
            mean, var = self.running_mean, self.running_var
        p = torch.sigmoid((x - mean) * torch.rsqrt(var.clamp_min(0) + self.eps))
        return x * (p + (1 - p) * self.alpha)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


def apply_reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, through Dice's :meth:`Dice.forward_reference` (the plain formula) when it is a Dice."""
    return module.forward_reference(x) if isinstance(module, Dice) else module(x)


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
