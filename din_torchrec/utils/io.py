"""Atomic file output: write to a temporary file in the same folder, then rename over the target.

A crash mid-write leaves the previous file (or nothing) at the target path, never a truncated one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_with(path: str | Path, writer: Callable[[str], Any], suffix: str = "") -> Path:
    """Call ``writer(tmp_path)`` to produce the file, then rename it to ``path``.

    ``suffix`` keeps the extension on the temporary name for writers that infer the format from it
    (matplotlib's ``savefig``, pyarrow).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    # mkstemp creates the file 0600; give the result the mode a plain open() would (0666 minus the umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_replace_dir(tmp_dir: str | Path, final_dir: str | Path) -> Path:
    """Move a fully written folder ``tmp_dir`` to ``final_dir``, replacing any previous one.

    The old folder is renamed aside first and removed only after the new one is in place, so at every
    instant either the old or the new complete folder exists under ``final_dir`` (or its ``.old`` twin).
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)
    return final_dir
