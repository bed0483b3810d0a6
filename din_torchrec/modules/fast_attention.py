"""A faster DIN target attention on jagged sequences, computing exactly what
:class:`~din_torchrec.modules.attention.TargetAttentionPooling` computes, with the same parameters.

Where :meth:`LocalActivationUnit.scores_jagged` spends its time at long histories (N rows of ``[b, c, b-c,
b*c]`` scored by an MLP with Dice): the broadcasting element-wise ops of Dice (``(x - E[x]) / sqrt(Var[x])``,
``sigmoid``, ``x * (p + (1 - p) alpha)``) over ``[N, H]``, forward and backward, take more time than the
matmuls. This module changes how, not what:

* :func:`dice` normalises with ATen's fused batch-norm kernel (``native_batch_norm`` in training mode: one
  pass for the statistics and the normalisation, and a fused backward), gates with a small autograd
  function whose backward is written out (``x (alpha + (1 - alpha) sigmoid(z))``), and updates Dice's running estimates exactly as
  :class:`~din_torchrec.modules.activations.Dice` does (biased batch variance, ``lerp`` by the momentum);
* the first layer is the split one of ``scores_jagged`` done as one matmul:
  ``[b, b*c] @ [W_b + W_d; W_p]^T`` plus the candidate part ``(W_c - W_d) c + bias`` computed once per
  sample and added to each of its rows;
* the pooling ``sum_j a_j b_j`` is one ``index_add`` over the jagged rows.

:func:`fast_scores` / :func:`fast_target_attention` take the existing modules, so wiring is a call-site
change: ``TargetAttentionPooling.forward`` -> ``fast_target_attention(self, ...)``. They fall back to the
module's own activation for PReLU / ReLU / sigmoid (no Dice). Tested against ``forward_padded`` and
``scores_reference`` (forward and gradients, empty and length-1 histories) in ``tests/bench``.
"""

from __future__ import annotations

import torch
from torch import nn

from din_torchrec.modules.activations import Dice
from din_torchrec.modules.attention import LocalActivationUnit, TargetAttentionPooling, segment_ids


class _DiceGate(torch.autograd.Function):
    """``x * (alpha + (1 - alpha) * sigmoid(z))`` with a hand-written backward (fewer passes over ``[M, H]``
    than autograd's chain of sigmoid, lerp and mul; checked against autograd in the tests)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, z: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        p = torch.sigmoid(z)
        one_minus_alpha = 1 - alpha
        gate = torch.addcmul(alpha, p, one_minus_alpha)
        ctx.save_for_backward(x, p, gate, one_minus_alpha)
        return x * gate

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, p, gate, one_minus_alpha = ctx.saved_tensors
        grad_x = grad * gate
        t = grad * x  # d out / d gate
        tp = t * p
        grad_alpha = t.sum(0) - tp.sum(0)  # sum over rows of t (1 - p)
        grad_z = tp.sub_(tp * p).mul_(one_minus_alpha)  # t (1 - alpha) p (1 - p)
        return grad_x, grad_z, grad_alpha


_MIN_ROWS = 32


def dice(module: Dice, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a 2-D ``x [M, H]`` (the same values, running estimates and gradients), faster."""
    if not module.training or x.shape[0] < _MIN_ROWS:
        # Few rows: nothing to gain, and a unit of (almost) zero batch variance is ill-conditioned (1/sqrt(eps)
        # amplifies rounding); the module's own formula then gives bit-for-bit the reference's values.
        return module(x)
    z, mean, invstd = torch.ops.aten.native_batch_norm(x, None, None, None, None, True, 0.0, module.eps)
    with torch.no_grad():
        module.running_mean.lerp_(mean.to(module.running_mean.dtype), module.momentum)
        var = invstd.to(module.running_var.dtype).pow(-2) - module.eps  # the biased batch variance
        module.running_var.lerp_(var, module.momentum)
    return _DiceGate.apply(x, z.to(x.dtype), module.alpha.to(x.dtype))


def _activation(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return dice(module, x) if isinstance(module, Dice) else module(x)


def _mlp(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = _activation(layer, x) if not isinstance(layer, nn.Linear) else layer(x)
    return x


def fast_scores(
    unit: LocalActivationUnit, behaviours: torch.Tensor, candidates: torch.Tensor, segments: torch.Tensor
) -> torch.Tensor:
    """``unit.scores_jagged(behaviours, candidates, segments)``, faster: ``[N, D], [B, D], [N] -> [N]``."""
    d = unit.embedding_dim
    w_b, w_c, w_d, w_p = unit.first.weight.split(d, dim=1)
    cand_part = torch.addmm(unit.first.bias, candidates, (w_c - w_d).t())  # [B, H], once per sample
    cand_rows = candidates.index_select(0, segments)
    x = torch.cat([behaviours, behaviours * cand_rows], dim=1)  # [N, 2D]
    h = torch.addmm(cand_part.index_select(0, segments), x, torch.cat([w_b + w_d, w_p], dim=1).t())
    h = _activation(unit.first_activation, h)
    return _mlp(unit.rest.layers, h).squeeze(-1)


def fast_target_attention(
    att: TargetAttentionPooling, behaviours: torch.Tensor, lengths: torch.Tensor, candidates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``att(behaviours, lengths, candidates)``, faster: ``(pooled [B, D], weights [N])``."""
    segments = segment_ids(lengths)
    scores = fast_scores(att.unit, behaviours, candidates, segments)
    if att.normalization == "softmax":
        from din_torchrec.modules.attention import segment_softmax

        weights = segment_softmax(scores, segments, lengths.numel())
    else:
        weights = scores
    pooled = torch.zeros_like(candidates).index_add(0, segments, behaviours * weights.unsqueeze(-1))
    return pooled, weights
