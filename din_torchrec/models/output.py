"""What every model's forward returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree


@dataclass
class ModelOutput:
    """Result of ``model(batch)``.

    Attributes:
        logits: ``[B]`` click logits.
        aux_loss: a scalar added to the loss (DIEN's auxiliary loss), or None.
        attention: ``[N]`` attention weight of every history behaviour (jagged, aligned with the batch's
            history values), or None for models without target attention.
        embeddings: feature name -> the looked-up rows (``[num values, D]``) that the mini-batch-aware
            regularizer penalises.
    """

    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)


# DistributedModelParallel wraps the dense part in DDP with static_graph=True, whose gradient all-reduce is
# triggered through the tensors it finds in the forward output by pytree flattening. An unregistered
# dataclass is an opaque leaf: DDP then finds no tensor and silently skips the all-reduce (seen: each rank
# kept its local gradients). Registering the dataclass makes its tensors visible.
pytree.register_dataclass(ModelOutput)
