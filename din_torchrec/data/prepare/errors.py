"""Bad input in the downloaded files: raise with the file and line, or skip and count (``on_error``).

Every problem found while reading a source goes through :class:`ErrorLog.report`:

* ``on_error="raise"`` (the default): :class:`PrepareError` is raised at once, its message starting with
  ``<file>:<line>:`` (or ``<file>:`` when no line applies) and saying what was expected and what was found.
* ``on_error="skip"``: the offending line (or entry) is left out and counted under its reason; the counts,
  with the first message of each reason, go to ``meta.json`` under ``"skipped"``. Nothing is dropped
  silently.

A missing or unreadable input file is always an error: there is nothing to skip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from din_torchrec.data.validation import DataError

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")

__all__ = ["ON_ERROR_CHOICES", "ErrorLog", "OnError", "PrepareError", "location"]


class PrepareError(DataError):
    """A source file is missing, unreadable or holds a line that cannot be converted."""


def location(file: str | Path, line: int | None = None) -> str:
    """``"file:line"`` (or ``"file"``), the prefix of every message."""
    return f"{file}:{line}" if line is not None else str(file)


class ErrorLog:
    """Applies the ``on_error`` policy and keeps the skip counts.

    Args:
        on_error: ``"raise"`` or ``"skip"``.
    """

    def __init__(self, on_error: str = "raise") -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error: expected one of {list(ON_ERROR_CHOICES)}, got {on_error!r}")
        self.on_error = on_error
        # file name -> reason -> {"count": n, "first": message}
        self._skipped: dict[str, dict[str, dict[str, Any]]] = {}

    def report(self, file: str | Path, line: int | None, reason: str, message: str, count: int = 1) -> None:
        """One bad line (or ``count`` of them, the first at ``line``) of ``file``.

        Raises:
            PrepareError: under ``on_error="raise"``.
        """
        text = f"{location(file, line)}: {message}"
        if self.on_error == "raise":
            raise PrepareError(
                text + " (pass on_error='skip' / --on-error skip to leave such lines out and count them)"
            )
        per_file = self._skipped.setdefault(Path(file).name, {})
        entry = per_file.setdefault(reason, {"count": 0, "first": text})
        entry["count"] += int(count)

    @property
    def total(self) -> int:
        """Lines (entries) skipped so far."""
        return sum(e["count"] for reasons in self._skipped.values() for e in reasons.values())

    def summary(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{file name: {reason: {"count": n, "first": "file:line: message"}}}``, sorted for stable JSON."""
        return {
            f: {r: dict(self._skipped[f][r]) for r in sorted(self._skipped[f])} for f in sorted(self._skipped)
        }


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a :class:`Path`; :class:`PrepareError` naming it and ``what`` it should hold if missing."""
    p = Path(path)
    if not p.exists():
        raise PrepareError(f"{p}: file does not exist (expected {what})")
    if not p.is_file():
        raise PrepareError(f"{p}: not a file (expected {what})")
    return p
