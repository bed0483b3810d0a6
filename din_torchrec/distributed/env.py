"""Process-group set-up for one process or many (torchrun / TorchX set the usual env variables)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, ParamSpec

import torch
import torch.distributed as dist

P = ParamSpec("P")

# Set once this process has made or joined a process group (see exit_process).
_group_made = False


@dataclass
class DistEnv:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: str = "auto", num_threads: int = 0) -> DistEnv:
    """Join (or create) the default process group and pick this rank's device.

    Launched by torchrun / TorchX (``WORLD_SIZE`` and ``MASTER_ADDR`` set), it joins that job; otherwise it
    makes a one-process group, so a single process runs the same DistributedModelParallel code path.

    ``num_threads`` > 0 sets torch's intra-op threads; 0 picks ``cores / local ranks`` when several ranks share
    a host (without it two ranks on two cores ran 15x slower here: each spawns a thread per core).
    """
    global _group_made
    backend = _pick_backend(backend)
    _group_made = True
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend=backend)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    elif local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistEnv(rank, world, local_rank, local_world, device, backend)


def shutdown_distributed() -> None:
    """Destroy the default process group if this process made or joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def made_process_group() -> bool:
    """Whether :func:`init_distributed` made or joined a process group in this process (even if destroyed since)."""
    return _group_made


def exit_process(rc: int = 0) -> NoReturn:
    """Destroy the process group, flush every log and stream, and leave through ``os._exit(rc)``.

    Skipping the interpreter's finalization is what keeps a finished rank from dying with SIGABRT
    ("terminate called without an active exception") after its work is done. Gloo's worker threads
    (``pt_gloo_runloop``) outlive ``destroy_process_group`` -- ProcessGroupGloo has no shutdown that joins
    them -- and can still hold a finished collective's work, and through it its tensors. When such a thread
    drops the last reference to a tensor that a Python object shares, it must take the GIL; if the
    interpreter is finalizing by then, CPython ends the thread with ``pthread_exit``, and the forced unwind
    through a ``noexcept`` C++ destructor calls ``std::terminate``. It takes a loaded CPU to open the window
    (the thread is descheduled between completing the work and releasing it): CI lost a run to it twice,
    once in a torchrun rank, once in an ``mp.spawn`` rank. Callers must have closed (and renamed into place)
    everything they write; nothing registered with ``atexit`` runs.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to save
            pass
    os._exit(rc)


def exits_without_finalization(fn: Callable[P, object]) -> Callable[P, NoReturn]:
    """Decorator for a ``torch.multiprocessing.spawn`` target: when ``fn`` returns, :func:`exit_process` (0).

    An exception still propagates, so ``spawn`` records its traceback for the parent as usual. Apply it to a
    module-level function (spawn pickles the target by name)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> NoReturn:
        fn(*args, **kwargs)
        exit_process(0)

    return wrapper
