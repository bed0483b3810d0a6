"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

Every rank writes its shards into ``<dir>.tmp``; after a barrier rank 0 writes ``meta.json`` (the marker of
a complete checkpoint) and renames the folder into place. A crash mid-save leaves the previous checkpoint;
a folder without ``meta.json`` is refused on load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from din_torchrec.utils.io import atomic_replace_dir, atomic_write_json

META_FILE = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete or does not fit the model."""


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Save ``model.state_dict()`` (sharded tensors stay sharded) to ``path`` atomically. Collective."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    if dist.is_initialized():
        dist.barrier()
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        atomic_write_json(tmp / META_FILE, {"format_version": FORMAT_VERSION, **meta})
        atomic_replace_dir(tmp, path)
    if dist.is_initialized():
        dist.barrier()
    return path


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a complete checkpoint, or CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no checkpoint folder here")
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{path}: incomplete checkpoint ({META_FILE} missing: the save did not finish)")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({e})") from e
    if not (path / ".metadata").exists():
        raise CheckpointError(f"{path}: incomplete checkpoint (DCP .metadata missing)")
    return meta


def load_checkpoint(path: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (any sharding). Collective."""
    meta = read_checkpoint_meta(path)
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # DCP raises CheckpointException / RuntimeError with per-rank details
        raise CheckpointError(f"{path}: could not load into this model ({type(e).__name__}: {e})") from e
    model.load_state_dict(state["model"])
    return meta
