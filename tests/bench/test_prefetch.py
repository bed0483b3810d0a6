"""The background-thread prefetcher: order, completeness, errors, early exit, read-ahead."""

from __future__ import annotations

import threading
import time

import pytest

from din_torchrec.modules.prefetch import Prefetcher


class Source:
    """A re-iterable source that records how far it has been read."""

    def __init__(self, n: int, fail_at: int | None = None, delay: float = 0.0) -> None:
        self.n, self.fail_at, self.delay = n, fail_at, delay
        self.produced = 0
        self.epoch = None
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        for i in range(self.n):
            if i == self.fail_at:
                raise ValueError(f"bad row {i}")
            if self.delay:
                time.sleep(self.delay)
            self.produced = i + 1
            yield i

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


@pytest.mark.parametrize("depth", [1, 2, 5])
@pytest.mark.parametrize("n", [0, 1, 7, 100])
def test_yields_every_item_in_order(n: int, depth: int) -> None:
    assert list(Prefetcher(Source(n), depth=depth)) == list(range(n))


def test_every_pass_starts_a_fresh_iteration_and_attributes_are_forwarded() -> None:
    src = Source(5)
    p = Prefetcher(src, depth=2)
    assert len(p) == 5
    p.set_epoch(3)
    assert src.epoch == 3
    assert list(p) == list(range(5))
    assert list(p) == list(range(5))
    assert src.passes == 2


def test_transform_runs_on_each_item_in_order() -> None:
    seen = []

    def transform(x: int) -> int:
        seen.append(threading.current_thread().name)
        return 10 * x

    assert list(Prefetcher(Source(4), transform=transform)) == [0, 10, 20, 30]
    assert all(name == "din-torchrec-prefetch" for name in seen), "transform runs on the producer thread"


def test_an_error_of_the_source_reaches_the_consumer_where_it_happened() -> None:
    got = []
    with pytest.raises(ValueError, match="bad row 3"):
        for x in Prefetcher(Source(10, fail_at=3), depth=4):
            got.append(x)
    assert got == [0, 1, 2]


def test_breaking_out_early_stops_the_producer() -> None:
    src = Source(10_000)
    p = Prefetcher(src, depth=2)
    it = iter(p)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert not it._thread.is_alive()
    assert src.produced <= 3 + 2 + 1, "read at most depth (+1 in hand) items ahead"
    with pytest.raises(StopIteration):
        next(it)
    # a new pass after an abandoned one starts from the beginning
    assert list(p)[:3] == [0, 1, 2]


def test_reads_ahead_while_the_consumer_holds_a_batch() -> None:
    src = Source(10)
    it = iter(Prefetcher(src, depth=3))
    assert next(it) == 0
    deadline = time.monotonic() + 10
    # 1 consumed + 3 queued + 1 read and waiting for room, without the consumer asking
    while src.produced < 5 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert src.produced == 5
    time.sleep(0.05)
    assert src.produced == 5, "the read-ahead is bounded by depth"
    assert list(it) == list(range(1, 10))


def test_overlaps_a_slow_source_with_a_slow_consumer() -> None:
    n, delay = 8, 0.03
    t0 = time.perf_counter()
    for _ in Prefetcher(Source(n, delay=delay), depth=2):
        time.sleep(delay)  # "compute" (sleep releases the GIL like a torch kernel or pyarrow)
    overlapped = time.perf_counter() - t0
    assert overlapped < 2 * n * delay * 0.85, (
        f"no overlap: {overlapped:.3f}s vs sequential {2 * n * delay:.3f}s"
    )


def test_depth_must_be_positive() -> None:
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(Source(1), depth=0)


def test_prefetching_the_real_reader_gives_the_same_batches(small_dataset) -> None:
    import torch

    from din_torchrec.data.reader import BehaviorReader
    from tests.conftest import small_experiment

    cfg = small_experiment(small_dataset, small_dataset / "unused")
    reader = BehaviorReader(
        small_dataset / "train", cfg.features, max_history=30, batch_size=4096, shuffle_buffer=8192, seed=1
    )
    reader.set_epoch(1)
    plain = list(reader)
    prefetched = Prefetcher(reader, depth=2)
    prefetched.set_epoch(1)
    got = list(prefetched)
    assert len(got) == len(plain) > 0
    for a, b in zip(plain, got):
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.sequence_features.values(), b.sequence_features.values())
        assert torch.equal(a.hist_lengths, b.hist_lengths)


def test_auto_prefetch_depth_reads_ahead_only_with_a_core_to_spare(monkeypatch) -> None:
    """-1 picks 2 beside a GPU or with >= 2 CPUs beyond torch's threads, else inline; set values are kept."""
    import os

    import torch

    from din_torchrec.training.trainer import prefetch_depth

    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert prefetch_depth(-1, cpu) == 0  # 2 CPUs, 1 torch thread: the reader would share a core
    assert prefetch_depth(-1, torch.device("cuda")) == 2
    assert prefetch_depth(3, cpu) == 3 and prefetch_depth(0, torch.device("cuda")) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert prefetch_depth(-1, cpu) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 15)
    assert prefetch_depth(-1, cpu) == 0


def test_config_refuses_a_negative_prefetch_depth_other_than_auto() -> None:
    import pytest

    from din_torchrec.config import ConfigError, ExperimentConfig

    cfg = ExperimentConfig()
    cfg.data.prefetch_batches = -2
    with pytest.raises(ConfigError, match="data.prefetch_batches"):
        cfg.validate()
