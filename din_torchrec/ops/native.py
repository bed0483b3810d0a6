"""The native CPU kernels (``native.cpp``: ``dice_kernel.h``, ``jagged_kernel.h``, ``lau_kernel.h``,
``linear_kernel.h``, ``pair_loss_kernel.h``, ``recurrence_kernel.h``, ``regularization_kernel.h``,
``tbe_backward_kernel.h``, ``tbe_forward_kernel.h``) as one
extension module, built on first use with the host's C++ compiler (``torch.utils.cpp_extension``).

The first build takes about 20-30 s and is cached under ``TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); the module name carries a hash of the sources, the torch version and the CPU's
feature flags (it is built with ``-march=native``), so an edit or another CPU gets its own build. Without a
compiler, or if the build fails, a warning is logged once and every caller runs its PyTorch path.
``DIN_TORCHREC_NATIVE_KERNELS=0`` or ``training.native_kernels: false`` turns the kernels off.
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

_DIR = Path(__file__).parent
_SOURCES = (
    "native.cpp",
    "kernel_math.h",
    "dice_kernel.h",
    "history_kernel.h",
    "jagged_kernel.h",
    "lau_kernel.h",
    "linear_kernel.h",
    "pair_loss_kernel.h",
    "recurrence_kernel.h",
    "regularization_kernel.h",
    "small_gemm.h",
    "tbe_common.h",
    "tbe_backward_kernel.h",
    "tbe_forward_kernel.h",
)
# -fopenmp: ATen's at::parallel_for is a header template whose OpenMP backend is a `#pragma omp parallel`;
# compiled without it, every kernel ran on one thread whatever torch.set_num_threads said (measured: the DIN
# first-layer kernel took 2.5 ms with 1 thread and with 2, the matmul it replaces 4.1 and 2.3 ms).
# All kernels are one translation unit, and GCC caps how much inlining may grow a large unit
# (inline-unit-growth, 40 % by default): when the TBE forward kernels were added, the unit crossed it and GCC
# stopped inlining small helpers in the other kernels' hot loops -- DIN training fell from 43-44k to 34-38k
# samples/s in `make demo` while the new kernels were not even called. The raised limits restore it (44.2k).
_CFLAGS = (
    "-O3",
    "-march=native",
    "-ffast-math",
    "-std=c++17",
    "-fopenmp",
    "--param=inline-unit-growth=400",
    "--param=large-unit-insns=100000",
)
_ENV = "DIN_TORCHREC_NATIVE_KERNELS"
_FAILED = "failed"
_lock = threading.Lock()
_state: dict[str, object] = {"enabled": os.environ.get(_ENV, "1") != "0", "module": None}


def set_enabled(enabled: bool) -> None:
    """Use the kernels (when they build) or not; the environment variable ``DIN_TORCHREC_NATIVE_KERNELS=0``
    wins."""
    _state["enabled"] = enabled and os.environ.get(_ENV, "1") != "0"
    if not _state["enabled"]:
        from din_torchrec.ops import tbe  # imports this module: imported here, not at the top

        tbe.uninstall()


def _build_tag() -> str:
    flags = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    h = hashlib.sha1(f"{flags}|{torch.__version__}|{' '.join(_CFLAGS)}".encode())
    for name in _SOURCES:  # torch hashes only the listed sources, not the headers they include
        h.update((_DIR / name).read_bytes())
    return h.hexdigest()[:12]


def kernels() -> ModuleType | None:
    """The built extension (building it on the first call); ``None`` when disabled or unbuildable."""
    if not _state["enabled"]:
        return None
    module = _state["module"]
    if module is None:
        with _lock:
            if _state["module"] is None:
                _state["module"] = _build()
            module = _state["module"]
    return None if module is _FAILED else module  # type: ignore[return-value]


def _ensure_ninja() -> bool:
    """``torch.utils.cpp_extension`` builds with ninja found on ``PATH``; the ``ninja`` wheel (a pinned
    requirement) puts it in the virtualenv's ``bin``, which is not on ``PATH`` unless the venv is activated."""
    if shutil.which("ninja"):
        return True
    try:
        import ninja  # type: ignore[import-not-found]
    except ImportError:
        return False
    os.environ["PATH"] = str(ninja.BIN_DIR) + os.pathsep + os.environ.get("PATH", "")
    return shutil.which("ninja") is not None


def _build() -> ModuleType | str:
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        log.warning("native kernels: no C++ compiler found; Dice and the recurrences run their PyTorch paths")
        return _FAILED
    if not _ensure_ninja():
        log.warning(
            "native kernels: ninja not found (pip install ninja); Dice and the recurrences run their "
            "PyTorch paths"
        )
        return _FAILED
    from torch.utils.cpp_extension import load

    try:
        name = f"din_torchrec_native_{_build_tag()}"  # reads the sources: a broken install lacks them
        log.info("building the native kernels %s (once per machine and version; cached)", name)
        return load(
            name=name,
            sources=[str(_DIR / "native.cpp")],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # any build or load failure: the PyTorch paths still work
        log.warning(
            "native kernels: build failed (%s: %s); Dice and the recurrences run their PyTorch paths",
            type(e).__name__,
            e,
        )
        return _FAILED


def loaded() -> ModuleType | None:
    """The extension if it is enabled and already built, else ``None`` -- never starts a build: for code off the
    models' path (the data reader's negative sampler), which must not trigger a compile of its own; in training
    the trainer has built it (``ops.tbe.install``) before the first batch is read."""
    module = _state["module"]
    if not _state["enabled"] or module is None or module is _FAILED:
        return None
    return module  # type: ignore[return-value]


def usable(x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Whether a kernel can run on ``x``: a CPU tensor of one of ``dtypes``, outside compile / tracing, with
    the extension built."""
    if x.device.type != "cpu" or x.dtype not in dtypes:
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return kernels() is not None
