"""Dice in training mode as one native CPU kernel, forward and backward (``dice_cpu.cpp``).

Why a hand-written kernel: Dice runs on every hidden layer of DIN's attention unit and DIEN's auxiliary net,
on ``[N, H]`` activations of all N behaviours of a batch. Through ATen it is ~9 passes over ``[N, H]``
forward and ~18 backward (batch norm, sigmoid, gate, products, sums, batch-norm backward), and each pass
costs ~0.2-0.5 ns per element here whether or not the tensor fits in cache; the kernel makes 2 passes each
way and recomputes the sigmoid instead of storing it (Dice forward + backward on ``[26k, 80]``: ~3 ms vs
~7-8 ms, docs/benchmarks.md). TorchInductor (``training.compile``) fuses the same passes but compiles per
model and pays it in every job; this kernel is built once per machine and cached.

The extension is compiled with the host's C++ compiler on first use (about 20 s, cached under
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``; the name carries a hash of the CPU's
feature flags because it is built with ``-march=native``). Without a compiler, or if the build fails, a
warning is logged once and Dice runs its ATen path (:meth:`~din_torchrec.modules.activations.Dice.forward`);
``DIN_TORCHREC_FUSED_DICE=0`` or ``training.fused_dice: false`` turns the kernel off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("dice_cpu.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {"enabled": os.environ.get("DIN_TORCHREC_FUSED_DICE", "1") != "0", "module": None}
_FAILED = "failed"


def set_enabled(enabled: bool) -> None:
    """Use the kernel (when it builds) or not; the environment variable ``DIN_TORCHREC_FUSED_DICE=0`` wins."""
    _state["enabled"] = enabled and os.environ.get("DIN_TORCHREC_FUSED_DICE", "1") != "0"


def _cpu_tag() -> str:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    return hashlib.sha1(f"{flags}|{torch.__version__}".encode()).hexdigest()[:10]


def kernel() -> ModuleType | None:
    """The built extension, building it on the first call; ``None`` when disabled or unbuildable."""
    if not _state["enabled"]:
        return None
    module = _state["module"]
    if module is None:
        with _lock:
            if _state["module"] is None:
                _state["module"] = _build()
            module = _state["module"]
    return None if module is _FAILED else module  # type: ignore[return-value]


def _build() -> ModuleType | str:
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        log.warning("fused Dice kernel: no C++ compiler found; Dice runs its ATen path")
        return _FAILED
    from torch.utils.cpp_extension import load

    name = f"din_torchrec_dice_{_cpu_tag()}"
    log.info("building the fused Dice kernel %s (once per machine; cached)", name)
    try:
        return load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-std=c++17"],
            verbose=False,
        )
    except Exception as e:  # any build or load failure: the ATen path still works
        log.warning("fused Dice kernel: build failed (%s: %s); Dice runs its ATen path", type(e).__name__, e)
        return _FAILED


def usable(x: torch.Tensor) -> bool:
    """Whether :func:`dice_train` can run on ``x``: a CPU float32/bfloat16 tensor, outside tracing."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return kernel() is not None


class _FusedDice(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: torch.Tensor, eps: float):  # type: ignore[override]
        mod = kernel()
        assert mod is not None
        a = alpha.detach().float().contiguous()
        out, mean, var, invstd = mod.dice_forward(x, a, eps)
        ctx.save_for_backward(x, mean, invstd, a)
        ctx.alpha_dtype = alpha.dtype
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _gm: torch.Tensor, _gv: torch.Tensor):  # type: ignore[override]
        x, mean, invstd, a = ctx.saved_tensors
        mod = kernel()
        assert mod is not None
        grad_x, grad_alpha = mod.dice_backward(grad.contiguous(), x, mean, invstd, a)
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
