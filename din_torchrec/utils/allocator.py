"""glibc malloc settings for CPU training: keep large freed blocks instead of returning them to the kernel.

A CTR training step on the CPU allocates and frees the same large temporaries every batch (DIN's attention
activations are ``[N, H]`` with N ~ 26k behaviours, 8 MB each). glibc serves blocks above its mmap threshold
with a fresh ``mmap`` and trims freed heap tops back to the kernel, so those pages are faulted in again on
every step: measured here at 3,000-5,000 minor page faults and 5-9 ms of system time per DIN step
(batch 1024, about 60 ms a step), 0 faults after this tuning, same peak RSS. PyTorch's CPU allocator has no
cache of its own (its performance guide recommends jemalloc or tcmalloc via ``LD_PRELOAD``); ``mallopt``
gets the same effect in-process, with no extra library and nothing to set before Python starts.

What it sets (``mallopt(3)``):

* ``M_MMAP_THRESHOLD`` = 512 MiB: blocks up to that size come from the heap and are reused (setting it also
  turns off glibc's dynamic threshold, which otherwise moves with the last freed block and makes the fault
  count differ from run to run). glibc before 2.35 refuses values over 32 MiB (``DEFAULT_MMAP_THRESHOLD_MAX``
  on 64-bit); then 32 MiB is set. 32 MiB was this module's first choice, and too small: at history 200 DIN's
  ``[105k, 80]`` fp32 activations are 33.6 MB, and each was still mapped and faulted in anew (16,400 faults
  per allocation pair; Dice forward + backward 90 ms instead of ~20);
* ``M_TRIM_THRESHOLD`` = 1 GiB: freed memory at the top of the heap stays mapped up to that much.

The cost is that up to ``trim_threshold`` of freed memory stays resident between steps (it is reused by the
next step, so peak RSS does not change). Where glibc is not the C library (musl, macOS, Windows) it does
nothing. With jemalloc or tcmalloc preloaded it is harmless: they answer ``malloc`` instead of glibc.

:func:`tune_numpy_hugepages` (applied with it by the trainer) is the same kind of setting for numpy: numpy asks
the kernel for transparent huge pages on every array of 4 MiB or more (``madvise(MADV_HUGEPAGE)``). Where the
kernel's THP ``defrag`` setting compacts memory synchronously for such regions (``always``, ``madvise``,
``defer+madvise``: the default ``madvise`` on most distributions), the first touch of each 2 MB page waits for
that compaction: the reader's shuffle buffers cost 0.3 s of system time in a DIEN first epoch here (~2 ms per
1,024-sample batch; 0.04 s with 4 KB pages), with nothing to win back (the reader streams through its arrays
once). numpy's own switch for this, the ``NUMPY_MADVISE_HUGEPAGE`` environment variable, is read when numpy is
imported: too late inside a running job, so its runtime setter is called instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

M_TRIM_THRESHOLD = -1  # <malloc.h>
M_MMAP_THRESHOLD = -3
DEFAULT_MMAP_THRESHOLD = 512 << 20
OLD_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit; glibc < 2.35 refuses more
DEFAULT_TRIM_THRESHOLD = 1 << 30


@dataclass(frozen=True)
class MallocTuning:
    """What :func:`tune_malloc` did."""

    applied: bool
    reason: str
    mmap_threshold: int = 0
    trim_threshold: int = 0


_applied: MallocTuning | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def tune_malloc(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD, trim_threshold: int = DEFAULT_TRIM_THRESHOLD
) -> MallocTuning:
    """Apply the settings above once per process (later calls return the first result).

    Returns a :class:`MallocTuning` saying whether glibc accepted them and, if not, why.
    """
    global _applied
    if not 0 < mmap_threshold < 1 << 31:
        raise ValueError(f"mmap_threshold: expected 1 byte to 2 GiB, got {mmap_threshold}")
    if not 0 < trim_threshold < 1 << 31:
        raise ValueError(f"trim_threshold: expected 1 byte to 2 GiB, got {trim_threshold}")
    if _applied is not None:
        return _applied
    libc = _glibc()
    if libc is None:
        _applied = MallocTuning(False, f"C library is not glibc ({platform.libc_ver()[0] or sys.platform})")
        return _applied
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
        mmap_threshold = min(mmap_threshold, OLD_GLIBC_MMAP_THRESHOLD_MAX)  # an older glibc's ceiling
        if libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) != 1:
            _applied = MallocTuning(False, "mallopt refused M_MMAP_THRESHOLD")
            return _applied
    ok = libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1
    reason = "mallopt accepted both settings" if ok else "mallopt refused M_TRIM_THRESHOLD"
    _applied = MallocTuning(ok, reason, mmap_threshold, trim_threshold)
    return _applied


#: THP defrag modes in which a fault on a ``MADV_HUGEPAGE`` region compacts memory synchronously.
SYNC_DEFRAG_MODES = ("always", "madvise", "defer+madvise")
THP_DEFRAG = "/sys/kernel/mm/transparent_hugepage/defrag"


def thp_defrag_mode(path: str = THP_DEFRAG) -> str | None:
    """The selected mode of the kernel's THP defrag setting (``[madvise]`` in the file), or None if unknown."""
    try:
        text = Path(path).read_text(encoding="ascii")
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def tune_numpy_hugepages(defrag_path: str = THP_DEFRAG) -> bool:
    """Turn numpy's huge-page requests off where the kernel would compact synchronously for them (module
    docstring). Returns whether numpy's setting is off afterwards (unchanged where the mode is cheap or unknown,
    or numpy has no runtime setter)."""
    try:
        from numpy._core import multiarray  # numpy >= 2; its documented runtime switch lives here
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    setter = getattr(multiarray, "_set_madvise_hugepage", None)
    if setter is None:
        return False
    if thp_defrag_mode(defrag_path) in SYNC_DEFRAG_MODES:
        setter(False)
    getter = getattr(multiarray, "_get_madvise_hugepage", None)
    return getter is not None and not getter()
