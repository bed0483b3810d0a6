"""glibc malloc tuning: large per-step temporaries stop page-faulting once it is applied.

Each case runs in a fresh interpreter: the settings are per process, and the fault count must not include
this test process's own history.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from din_torchrec.utils.allocator import tune_malloc

_PROBE = """
import json, resource, sys, torch
from din_torchrec.utils.allocator import tune_malloc
tuning = tune_malloc() if sys.argv[1] == "1" else None
x = torch.ones(int(sys.argv[2]), 80)     # 8 MB: a DIN attention activation at history 50; 34 MB at 200
for _ in range(10):                      # warm-up: let the heap grow to its working size
    y = x * 2; z = y + 1; del y, z
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):                     # a training step's pattern: allocate, touch, free
    y = x * 2; z = y + 1; del y, z
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"faults": after - before, "applied": tuning.applied if tuning else None}))
"""

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _probe(tuned: bool, rows: int = 26_000) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, "1" if tuned else "0", str(rows)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the tuning is for glibc's malloc")
def test_tuned_process_reuses_large_blocks_without_page_faults() -> None:
    tuned = _probe(True)
    assert tuned["applied"] is True
    # 200 allocations of 8 MB = 400,000 pages if each were faulted in anew (untuned runs here: 8,000 to
    # 161,000 for 80); tuned, the heap is reused and grows at most once more (0 to 6,100 pages seen).
    assert tuned["faults"] < 20_000, tuned


@pytest.mark.skipif(not GLIBC, reason="the tuning is for glibc's malloc")
def test_blocks_over_32_mib_are_reused_too() -> None:
    """[105k, 80] fp32 = 33.6 MB, over glibc's old 32 MiB ceiling for the threshold: with that ceiling each
    allocation was mapped and faulted anew (1.6 million faults for these 200)."""
    tuned = _probe(True, rows=105_000)
    assert tuned["applied"] is True
    assert tuned["faults"] < 100_000, tuned


def test_thresholds_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="mmap_threshold"):
        tune_malloc(mmap_threshold=0)
    with pytest.raises(ValueError, match="trim_threshold"):
        tune_malloc(trim_threshold=0)


def test_an_older_glibc_that_refuses_large_thresholds_gets_its_ceiling(monkeypatch) -> None:
    """glibc < 2.35 refuses an mmap threshold over 32 MiB: the tuning then sets 32 MiB instead of giving up."""
    from din_torchrec.utils import allocator

    calls: list[tuple[int, int]] = []

    class OldLibc:
        class _Fn:
            argtypes = restype = None

            def __call__(self, param: int, value: int) -> int:
                calls.append((param, value))
                return 0 if param == allocator.M_MMAP_THRESHOLD and value > 32 << 20 else 1

        mallopt = _Fn()

    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.setattr(allocator, "_glibc", lambda: OldLibc())
    result = allocator.tune_malloc()
    assert result.applied and result.mmap_threshold == 32 << 20
    assert calls == [
        (allocator.M_MMAP_THRESHOLD, 512 << 20),
        (allocator.M_MMAP_THRESHOLD, 32 << 20),
        (allocator.M_TRIM_THRESHOLD, 1 << 30),
    ]


def test_thp_defrag_mode_reads_the_selected_word(tmp_path) -> None:
    from din_torchrec.utils.allocator import thp_defrag_mode

    f = tmp_path / "defrag"
    f.write_text("always defer defer+madvise [madvise] never\n")
    assert thp_defrag_mode(str(f)) == "madvise"
    f.write_text("always [defer+madvise] never\n")
    assert thp_defrag_mode(str(f)) == "defer+madvise"
    assert thp_defrag_mode(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    ("mode", "turned_off"),
    [("madvise", True), ("always", True), ("defer+madvise", True), ("defer", False), ("never", False)],
)
def test_numpy_hugepages_off_only_where_faults_would_compact(tmp_path, mode: str, turned_off: bool) -> None:
    """numpy's huge-page requests are turned off exactly for the defrag modes that compact synchronously on a
    madvised fault; elsewhere numpy's own setting stays."""
    from numpy._core import multiarray

    from din_torchrec.utils.allocator import tune_numpy_hugepages

    f = tmp_path / "defrag"
    f.write_text(
        " ".join(
            f"[{m}]" if m == mode else m for m in ("always", "defer", "defer+madvise", "madvise", "never")
        )
    )
    before = multiarray._get_madvise_hugepage()
    try:
        multiarray._set_madvise_hugepage(True)
        assert tune_numpy_hugepages(str(f)) is turned_off
        assert multiarray._get_madvise_hugepage() is (not turned_off)
    finally:
        multiarray._set_madvise_hugepage(before)
