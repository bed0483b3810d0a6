"""A faster CPU kernel for FBGEMM's unpooled table-batched embedding backward with row-wise Adagrad.

TorchRec's fused ``EmbeddingCollection`` (the behaviour sequences: one embedding row per position) trains on
the CPU through FBGEMM's ``fbgemm::split_embedding_nobag_backward_codegen_rowwise_adagrad_cpu``. That kernel
gathers each row's gradient through nested ``std::unordered_map``s with a heap-allocated vector per distinct
row: 110-180 ns per lookup here, the largest single cost of a DIEN step (12 ms of 100, six sequence
features) and 2.8 ms of a DIN step, on one thread. :func:`install` registers ``tbe_backward_kernel.h`` -- the
same inputs, arithmetic and in-place result, with open-addressing tables of slots and gradient buffers, one
per thread for its hash partition of the rows -- as the operator's CPU kernel, so TorchRec's autograd path
calls it unchanged; :func:`uninstall` puts FBGEMM's back (the dispatcher keeps the earlier kernel). Tests train whole FBGEMM modules with both kernels on random
batches (shared tables, int32 / int64 ids, float16 weights, every weight-decay mode) and compare 1, 2 and 3
threads.

Installed by the trainer when the native kernels are on (``DIN_TORCHREC_NATIVE_KERNELS=0`` or
``training.native_kernels: false`` keep FBGEMM's); it changes nothing on GPUs (CUDA has its own kernels).
"""

from __future__ import annotations

import threading
import warnings

import torch

from din_torchrec.ops import native

OP = "split_embedding_nobag_backward_codegen_rowwise_adagrad_cpu"

_lock = threading.Lock()
_state: dict[str, torch.library.Library | None] = {"lib": None}


def _kernel(
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


def installed() -> bool:
    return _state["lib"] is not None


def install() -> bool:
    """Register the kernel for FBGEMM's operator on the CPU (idempotent). False when the native kernels are
    off or unbuildable, or FBGEMM is not loaded; FBGEMM's kernel then stays."""
    with _lock:
        if _state["lib"] is not None:
            return True
        if native.kernels() is None:
            return False
        try:
            import fbgemm_gpu  # noqa: F401 -- registers the fbgemm operators

            getattr(torch.ops.fbgemm, OP)
        except (ImportError, AttributeError, RuntimeError):
            return False
        lib = torch.library.Library("fbgemm", "IMPL")  # noqa: TOR901 -- adds a kernel to FBGEMM's operator
        with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
            warnings.simplefilter("ignore")
            lib.impl(OP, _kernel, "CPU")
        _state["lib"] = lib
        return True


def uninstall() -> None:
    """Back to FBGEMM's kernel."""
    with _lock:
        lib = _state["lib"]
        if lib is not None:
            lib._destroy()
            _state["lib"] = None
