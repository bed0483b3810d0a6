"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically and verified on load.

Saving: every rank writes its shards (model, fused sparse optimizer state, dense optimizer state) into
``<dir>.tmp``; after a barrier rank 0 records every file's size and BLAKE2b digest in ``meta.json`` (the
marker of a complete checkpoint) and renames the folder into place. A crash mid-save leaves the previous
checkpoint untouched and at most a stale ``.tmp`` folder, which the next save removes.

Loading: ``meta.json`` must exist and every file must match its recorded size and digest *before* DCP
touches the model, so a truncated or corrupted checkpoint is refused with the file named, never loaded half
way. DCP reshards on load: a checkpoint written by N ranks loads into any number of ranks, one included.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from din_torchrec.utils.io import atomic_replace_dir, atomic_write_json

META_FILE = "meta.json"
FORMAT_VERSION = 2
_CHUNK = 1 << 22


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, incomplete, corrupted or does not fit the model."""


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_table(folder: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name: {"bytes": p.stat().st_size, "blake2b": _digest(p)}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != META_FILE
    }


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(
    path: str | Path, model: nn.Module, meta: dict[str, Any], optimizer: Any | None = None
) -> Path:
    """Save ``model`` (and ``optimizer``, a TorchRec KeyedOptimizer) to ``path`` atomically. Collective.

    ``meta`` (JSON-serialisable: epoch, step, data position, curves) is stored in ``meta.json``.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        state["optim"] = optimizer.state_dict()
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if rank == 0:
        files = _file_table(tmp)
        atomic_write_json(
            tmp / META_FILE,
            {
                "format_version": FORMAT_VERSION,
                "has_optimizer": optimizer is not None,
                "files": files,
                **meta,
            },
        )
        atomic_replace_dir(tmp, path)
    _barrier()
    return path


def read_checkpoint_meta(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The metadata of a complete checkpoint; with ``verify`` every file's size and digest are checked.

    Raises CheckpointError naming what is wrong (missing folder, unfinished save, missing, truncated or
    corrupted file).
    """
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
    files = meta.get("files")
    if not isinstance(files, dict) or ".metadata" not in files:
        raise CheckpointError(
            f"{meta_path}: no file table (not a din_torchrec checkpoint of format {FORMAT_VERSION})"
        )
    if verify:
        for name, expected in files.items():
            f = path / name
            if not f.exists():
                raise CheckpointError(f"{f}: missing checkpoint file")
            size = f.stat().st_size
            if size != expected["bytes"]:
                raise CheckpointError(
                    f"{f}: {size} bytes, expected {expected['bytes']} (truncated or replaced)"
                )
            if _digest(f) != expected["blake2b"]:
                raise CheckpointError(
                    f"{f}: contents do not match the digest recorded at save time (corrupted)"
                )
    return meta


def _flat_keys(state: dict[str, Any]) -> set[str]:
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    return set(flatten_state_dict(state)[0].keys())


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: Any | None = None, partial_optimizer: bool = False
) -> dict[str, Any]:
    """Verify, then load a checkpoint into ``model`` (any sharding) and ``optimizer`` if given. Collective.

    DCP loads in place: the optimizer's lazily created state (Adam's moments) must exist already; call
    ``init_state()`` on the dense KeyedOptimizer first (the fused optimizers allocate theirs up front).

    ``partial_optimizer``: optimizer state the checkpoint lacks keeps its fresh values instead of failing.
    Needed when resuming on another world size, where the planner may move a small table between a fused
    sharding (state in the fused optimizer) and data parallel (state in the dense optimizer). The model
    itself must always load completely.
    """
    meta = read_checkpoint_meta(path)
    state: dict[str, Any] = {"model": model.state_dict()}
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise CheckpointError(f"{path}: saved without optimizer state, cannot resume training from it")
        state["optim"] = optimizer.state_dict()
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    missing_model = sorted(k for k in _flat_keys({"model": state["model"]}) if k not in saved)
    if missing_model:
        raise CheckpointError(
            f"{path}: the checkpoint lacks model entries {missing_model[:5]} (another model?)"
        )
    missing_optim = sorted(k for k in _flat_keys(state) if k not in saved and not k.startswith("model."))
    if missing_optim and not partial_optimizer:
        raise CheckpointError(f"{path}: the checkpoint lacks optimizer state {missing_optim[:5]}")
    planner = dcp.DefaultLoadPlanner(allow_partial_load=bool(missing_optim))
    try:
        dcp.load(state, checkpoint_id=str(path), planner=planner)
    except Exception as e:  # DCP raises CheckpointException / RuntimeError with per-rank details
        raise CheckpointError(f"{path}: could not load into this model ({type(e).__name__}: {e})") from e
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optim"])
    meta["reinitialised_optimizer_state"] = missing_optim
    return meta
