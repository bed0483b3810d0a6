"""Faster CPU kernels for FBGEMM's table-batched embedding (TBE) operators, the lookups behind TorchRec's
fused collections on the CPU.

* ``fbgemm::split_embedding_nobag_backward_codegen_rowwise_adagrad_cpu`` -- the backward + row-wise Adagrad
  update of the unpooled tables (``EmbeddingCollection``: the behaviour sequences, one row per position).
  FBGEMM gathers each row's gradient through nested ``std::unordered_map``s with a heap-allocated vector per
  distinct row: 110-180 ns per lookup here, the largest single cost of a DIEN step (12 ms of 100, six
  sequence features) and 2.8 ms of a DIN step, on one thread. ``tbe_backward_kernel.h`` computes the same
  in-place result with open-addressing tables of slots and gradient buffers, one per thread for its hash
  partition of the rows.
* ``fbgemm::split_embedding_nobag_codegen_forward_cpu`` and ``fbgemm::split_embedding_codegen_forward_cpu``
  -- the unpooled and pooled (``EmbeddingBagCollection``) forward lookups. FBGEMM's unpooled kernel copies
  rows element by element without prefetching (55 ns per 256-byte row of a 1 GB table, where
  ``index_select`` takes 28); ``tbe_forward_kernel.h`` requests rows 32 lookups ahead in both.

:func:`install` registers these as the operators' CPU kernels (``torch.library``), so TorchRec's autograd
path calls them unchanged; :func:`uninstall` puts FBGEMM's back (the dispatcher keeps the earlier kernels).
Tests run whole FBGEMM modules with both sets of kernels on random batches (shared tables, int32 / int64
ids, float16 weights, per-lookup weights, mean pooling, every weight-decay mode) and compare 1, 2 and 3
threads.

Installed by the trainer when the native kernels are on (``DIN_TORCHREC_NATIVE_KERNELS=0`` or
``training.native_kernels: false`` keep FBGEMM's); it changes nothing on GPUs (CUDA has its own kernels).
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator

import torch

from din_torchrec.ops import native

BACKWARD_OP = "split_embedding_nobag_backward_codegen_rowwise_adagrad_cpu"
NOBAG_FORWARD_OP = "split_embedding_nobag_codegen_forward_cpu"
POOLED_FORWARD_OP = "split_embedding_codegen_forward_cpu"

_lock = threading.Lock()
_state: dict[str, torch.library.Library | None] = {"lib": None}


def _backward(
    grad_output: torch.Tensor,
    host_weights: torch.Tensor,
    weights_placements: torch.Tensor,
    weights_offsets: torch.Tensor,
    D: int,  # noqa: N803 -- the operator's argument name
    hash_size_cumsum: torch.Tensor,
    total_hash_size_bits: int,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    stochastic_rounding: bool,
    momentum1_host: torch.Tensor,
    momentum1_placements: torch.Tensor,
    momentum1_offsets: torch.Tensor,
    learning_rate_tensor: torch.Tensor,
    eps: float = 0.0,
    weight_decay: float = 0.0,
    weight_decay_mode: int = 0,
    max_norm: float = 0.0,
) -> None:
    mod = native.kernels()
    assert mod is not None, "installed only when the native kernels are built"
    mod.nobag_rowwise_adagrad_backward(
        grad_output,
        host_weights,
        weights_offsets,
        D,
        hash_size_cumsum,
        indices,
        offsets,
        momentum1_host,
        momentum1_offsets,
        float(learning_rate_tensor.item()),
        eps,
        weight_decay,
        weight_decay_mode,
    )


def _nobag_forward(
    weights: torch.Tensor,
    weights_offsets: torch.Tensor,
    D: int,  # noqa: N803 -- the operator's argument name
    hash_size_cumsum: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    output_dtype: int,
) -> torch.Tensor:
    mod = native.kernels()
    assert mod is not None, "installed only when the native kernels are built"
    return mod.tbe_nobag_forward(
        weights, weights_offsets, D, hash_size_cumsum, indices, offsets, output_dtype
    )


def _pooled_forward(
    weights: torch.Tensor,
    weights_offsets: torch.Tensor,
    D_offsets: torch.Tensor,  # noqa: N803 -- the operator's argument names
    total_D: int,  # noqa: N803
    hash_size_cumsum: torch.Tensor,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    pooling_mode: int,
    indice_weights: torch.Tensor | None,
    output_dtype: int,
) -> torch.Tensor:
    mod = native.kernels()
    assert mod is not None, "installed only when the native kernels are built"
    if indice_weights is None:  # FBGEMM passes an undefined tensor for "no per-lookup weights"
        indice_weights = _NO_WEIGHTS
    return mod.tbe_pooled_forward(
        weights,
        weights_offsets,
        D_offsets,
        int(total_D),
        hash_size_cumsum,
        indices,
        offsets,
        pooling_mode,
        indice_weights,
        output_dtype,
    )


_NO_WEIGHTS = torch.empty(0)
KERNELS = {BACKWARD_OP: _backward, NOBAG_FORWARD_OP: _nobag_forward, POOLED_FORWARD_OP: _pooled_forward}


def installed() -> bool:
    return _state["lib"] is not None


def install() -> bool:
    """Register the kernels for FBGEMM's operators on the CPU (idempotent). False when the native kernels are
    off or unbuildable, or FBGEMM is not loaded; FBGEMM's kernels then stay."""
    with _lock:
        if _state["lib"] is not None:
            return True
        if native.kernels() is None:
            return False
        try:
            import fbgemm_gpu  # noqa: F401 -- registers the fbgemm operators

            for op in KERNELS:
                getattr(torch.ops.fbgemm, op)
        except (ImportError, AttributeError, RuntimeError):
            return False
        lib = torch.library.Library("fbgemm", "IMPL")  # noqa: TOR901 -- adds a kernel to FBGEMM's operator
        with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
            warnings.simplefilter("ignore")
            for op, kernel in KERNELS.items():
                lib.impl(op, kernel, "CPU")
        _state["lib"] = lib
        return True


@contextlib.contextmanager
def registration_restored() -> Iterator[None]:
    """On leaving the block, the kernels are registered again exactly when they were on entering it (the
    block may :func:`install` / :func:`uninstall` them, e.g. to time both)."""
    was = installed()
    try:
        yield
    finally:
        (install if was else uninstall)()


def uninstall() -> None:
    """Back to FBGEMM's kernels."""
    with _lock:
        lib = _state["lib"]
        if lib is not None:
            lib._destroy()
            _state["lib"] = None
