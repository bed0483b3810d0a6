"""Process-group set-up for one process or many (torchrun / TorchX set the usual env variables)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    backend = _pick_backend(backend)
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
