"""Line-by-line reading of plain or gzip-compressed text files, with line numbers and clear errors."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterator
from pathlib import Path

from din_torchrec.data.prepare.errors import PrepareError, require_file

__all__ = ["iter_lines", "is_gzip"]

_GZIP_MAGIC = b"\x1f\x8b"


def is_gzip(path: str | Path) -> bool:
    """Whether ``path`` starts with the gzip magic bytes (the extension is not trusted)."""
    with open(path, "rb") as f:
        return f.read(2) == _GZIP_MAGIC


def iter_lines(path: str | Path, what: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, line bytes without the trailing newline)`` of a plain or gzip text file.

    Line numbers start at 1. Blank lines are yielded too (the callers decide what they are).

    Raises:
        PrepareError: the file is missing (naming ``what`` it should hold), unreadable, or a gzip stream is
            corrupt or truncated (naming the last line read).
    """
    p = require_file(path, what)
    lineno = 0
    try:
        opener = gzip.open if is_gzip(p) else open
        with opener(p, "rb") as f:
            for lineno, raw in enumerate(f, start=1):  # noqa: B007 (lineno is used after the loop)
                yield lineno, raw.rstrip(b"\r\n")
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise PrepareError(
            f"{p}:{lineno + 1}: corrupt or truncated gzip data after line {lineno} ({type(e).__name__}: {e})"
        ) from e
    except OSError as e:
        raise PrepareError(f"{p}: cannot read file ({type(e).__name__}: {e})") from e
