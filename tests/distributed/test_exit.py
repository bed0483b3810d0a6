"""How a finished rank leaves: ``exit_process`` / ``exits_without_finalization`` (see their docstrings).

A spawned rank that returns must exit with status 0 without running the interpreter's finalization (no
``atexit`` handler), with its piped output flushed and its process group destroyed; one that raises must
still hand its traceback to the parent through ``torch.multiprocessing.spawn``.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from din_torchrec.distributed.env import exits_without_finalization


@exits_without_finalization
def _finished_rank(rank: int, store: str, marks: str) -> None:
    atexit.register(lambda: Path(marks, f"finalized-{rank}").write_text("atexit ran"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    t = torch.ones(8) * (rank + 1)
    dist.all_reduce(t)
    assert t.tolist() == [3.0] * 8
    print(f"rank {rank} done", end="")  # no newline: stays in the buffer unless exit_process flushes it


@exits_without_finalization
def _failing_rank(rank: int) -> None:
    if rank == 1:
        raise ValueError("rank 1 found a bad row")


def test_finished_ranks_exit_zero_without_finalization(tmp_path: Path) -> None:
    mp.spawn(_finished_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    assert not list(tmp_path.glob("finalized-*")), "atexit handlers ran: the interpreter was finalized"


def test_failing_rank_still_reports_its_traceback() -> None:
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 found a bad row"):
        mp.spawn(_failing_rank, nprocs=2, join=True)


def test_exit_process_flushes_and_keeps_the_status(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import torch.distributed as dist\n"
        "from din_torchrec.distributed.env import exit_process, init_distributed\n"
        "init_distributed('gloo')\n"
        "print('before exit', end='')\n"
        "exit_process(int(sys.argv[1]) if dist.is_initialized() else 99)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "MASTER_ADDR", "PYTHONUNBUFFERED")}
    for rc in (0, 3):
        r = subprocess.run(
            [sys.executable, "-c", code, str(rc)], capture_output=True, text=True, env=env, timeout=120
        )
        assert r.returncode == rc, r.stderr[-2000:]
        assert r.stdout == "before exit"
