"""Pipelined input: a background thread reads (and optionally transfers) the next batches while the model
computes on the current one.

``Prefetcher(reader, depth=2)`` is a drop-in wrapper of any re-iterable batch source (e.g.
:class:`~din_torchrec.data.reader.BehaviorReader`): each ``iter()`` starts one producer thread that pulls
batches from a fresh ``iter(reader)`` into a bounded queue of ``depth`` batches, in order, and the consumer
gets exactly the batches of the source, in the source's order, then ``StopIteration``. An exception raised by
the source is re-raised in the consumer at the position it occurred; breaking out of the loop early (or
``close()``) stops and joins the producer, which then drops whatever it had read ahead.

Overlap comes from the parts of reading that release the GIL (parquet decoding in pyarrow, numpy and torch
kernels); ``transform`` (e.g. ``lambda b: b.to(device, non_blocking=True)``, or pinning memory) runs on the
producer thread too. Attributes other than iteration (``len``, ``set_epoch``, ...) are forwarded to the
source.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_END = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class PrefetchIterator(Iterator[T]):
    """One pass over the source, read ahead by a daemon thread."""

    def __init__(self, source: Iterable[T], depth: int, transform: Callable[[T], T] | None) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(
            target=self._produce, args=(source, transform), name="din-torchrec-prefetch", daemon=True
        )
        self._thread.start()

    def _put(self, item: Any) -> bool:
        """Block until there is room (or the consumer stopped); False when stopped."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, source: Iterable[T], transform: Callable[[T], T] | None) -> None:
        try:
            for item in source:
                if transform is not None:
                    item = transform(item)
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # re-raised in the consumer
            self._put(_Failure(e))

    def __iter__(self) -> PrefetchIterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self._finish()
            raise StopIteration
        if isinstance(item, _Failure):
            self._finish()
            raise item.exc
        return item

    def _finish(self) -> None:
        self._done = True
        self._thread.join()

    def close(self) -> None:
        """Stop the producer and drop what it read ahead."""
        self._done = True
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join()

    def __del__(self) -> None:
        if not self._done:
            self._stop.set()


class Prefetcher(Generic[T]):
    """Wraps a re-iterable source; ``depth`` batches are read ahead (``depth`` >= 1)."""

    def __init__(
        self, source: Iterable[T], depth: int = 2, transform: Callable[[T], T] | None = None
    ) -> None:
        if depth < 1:
            raise ValueError(f"Prefetcher depth must be >= 1, got {depth}")
        self.source = source
        self.depth = depth
        self.transform = transform
        self._active: PrefetchIterator[T] | None = None

    def __iter__(self) -> PrefetchIterator[T]:
        if self._active is not None:
            self._active.close()
        self._active = PrefetchIterator(self.source, self.depth, self.transform)
        return self._active

    def close(self) -> None:
        if self._active is not None:
            self._active.close()
            self._active = None

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found normally: forward set_epoch, etc. to the source.
        if name in ("source", "depth", "transform", "_active"):
            raise AttributeError(name)
        return getattr(self.source, name)
