"""``training.compile``: the dense hot spots of a model through ``torch.compile`` (TorchInductor).

What is compiled, and why these: on the CPU a DIN / DIEN step spends most of its dense time in element-wise
passes over ``[N, H]`` activations of the N behaviours of a batch (Dice's normalisation and gate, the
sigmoids of DIEN's auxiliary net) between matmuls. Inductor fuses those passes into one or two generated
loops, forward and backward:

* ``LocalActivationUnit.scores_jagged`` (DIN's target attention, DIEN's evolution attention);
* ``AuxiliaryNextBehaviourLoss.score_pairs`` (DIEN's auxiliary net);
* the top MLP (``SequenceCTRModel.top``).

Everything else stays eager: the TorchRec embedding collections (sharded, fused optimizers), the jagged
bookkeeping with host syncs, and the recurrences (a data-dependent Python loop; they have their own
single-node autograd function, :mod:`~din_torchrec.modules.recurrence`).

Compiled with ``dynamic=True`` so that the number of behaviours per batch does not trigger recompiles; the
first steps pay the compile (seconds to tens of seconds, cached under ``TORCHINDUCTOR_CACHE_DIR``). The
functions are replaced on the module *instances* (instance attributes), so ``state_dict``, checkpoints and
the serving export of a freshly built model are untouched. Inductor on the CPU needs a C++ compiler.
Measured side by side in ``din-torchrec bench train`` (``NAME+compile``) and ``bench compare``.
"""

from __future__ import annotations

import torch
from torch import nn

from din_torchrec.modules.attention import LocalActivationUnit
from din_torchrec.modules.interest_evolution import AuxiliaryNextBehaviourLoss
from din_torchrec.modules.mlp import MLP


def compile_hot_paths(model: nn.Module) -> list[str]:
    """Compile the hot spots found in ``model`` (a model, or DMP around one) in place; returns their names."""
    done: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, LocalActivationUnit):
            module.scores_jagged = torch.compile(module.scores_jagged, dynamic=True)  # type: ignore[method-assign]
            done.append(f"{name}.scores_jagged")
        elif isinstance(module, AuxiliaryNextBehaviourLoss):
            module.score_pairs = torch.compile(module.score_pairs, dynamic=True)  # type: ignore[method-assign]
            module.fused = False  # the fused function would bypass the compiled score_pairs
            done.append(f"{name}.score_pairs")
        elif isinstance(module, MLP) and name.split(".")[-1] == "top":
            module.forward = torch.compile(module.forward, dynamic=True)  # type: ignore[method-assign]
            done.append(f"{name}.forward")
    return done
