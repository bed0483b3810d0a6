"""Checkpoints: exact resume after SIGKILL, resume on another world size, corrupt checkpoints refused."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from din_torchrec.config import dump_config
from din_torchrec.training.checkpoint import CheckpointError, read_checkpoint_meta
from tests.conftest import small_experiment
from tests.test_cli import _cli, _run


def _config(tmp_path: Path, data: Path, name: str) -> Path:
    cfg = small_experiment(data, tmp_path / name, "din")
    cfg.training.epochs = 2
    cfg.training.max_steps_per_epoch = 12
    cfg.training.checkpoint_every_steps = 4
    p = tmp_path / f"{name}.yaml"
    p.write_text(dump_config(cfg))
    return p


def _weights(checkpoint: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{checkpoint.parent.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(out))
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(
    tmp_path: Path, small_dataset: Path
) -> None:
    straight = _cli("train", "--config", str(_config(tmp_path, small_dataset, "straight")))
    assert straight.returncode == 0, straight.stderr[-3000:]

    cfg = _config(tmp_path, small_dataset, "killed")
    # Step 10 is in epoch 1 (12 steps each), after the checkpoint of step 8: 2 steps are lost and redone.
    killed = _cli("train", "--config", str(cfg), env_extra={"DIN_TORCHREC_KILL_AT_STEP": "10"})
    assert killed.returncode == -9, f"expected SIGKILL, got {killed.returncode}: {killed.stderr[-2000:]}"
    meta = read_checkpoint_meta(tmp_path / "killed" / "checkpoint")
    assert (meta["epoch"], meta["batches_done_in_epoch"], meta["step"]) == (0, 8, 8)
    assert not (tmp_path / "killed" / "metrics.json").exists()

    resumed = _cli("train", "--config", str(cfg), "--set", "training.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout

    a = _weights(tmp_path / "straight" / "checkpoint", tmp_path)
    b = _weights(tmp_path / "killed" / "checkpoint", tmp_path)
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        torch.testing.assert_close(b["model"][name], a["model"][name], rtol=0, atol=0, msg=name)
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert mb["steps"] == ma["steps"] == 24
    assert mb["final"]["auc"] == ma["final"]["auc"]


@pytest.mark.slow
def test_resume_on_another_world_size(tmp_path: Path, small_dataset: Path) -> None:
    cfg = _config(tmp_path, small_dataset, "grow")
    killed = _cli("train", "--config", str(cfg), env_extra={"DIN_TORCHREC_KILL_AT_STEP": "5"})
    assert killed.returncode == -9
    # 1 -> 2 processes: the 1-rank checkpoint (epoch 0, 4 batches) reshards onto 2 ranks.
    two = _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "din_torchrec.cli", "train", "--config", str(cfg), "--set", "training.resume=true"],
        env_extra={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-4000:]
    m2 = json.loads((tmp_path / "grow" / "metrics.json").read_text())
    assert m2["world_size"] == 2 and len(m2["epochs"]) == 2
    # 2 -> 1: the 2-rank checkpoint evaluates in one process to the same metrics (within tolerance).
    ev = _cli("evaluate", "--config", str(cfg))
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads(ev.stdout)["auc"] == pytest.approx(m2["final"]["auc"], abs=5e-4)
    # ... and resumes training there too (one more epoch).
    one = _cli("train", "--config", str(cfg), "--set", "training.resume=true", "--set", "training.epochs=3")
    assert one.returncode == 0, one.stderr[-3000:]
    m1 = json.loads((tmp_path / "grow" / "metrics.json").read_text())
    assert m1["world_size"] == 1 and len(m1["epochs"]) == 3


def test_corrupt_or_partial_checkpoints_are_refused_before_loading(
    tmp_path: Path, small_dataset: Path
) -> None:
    cfg = _config(tmp_path, small_dataset, "c")
    r = _cli(
        "train", "--config", str(cfg), "--set", "training.epochs=1", "--set", "training.max_steps_per_epoch=2"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    good = tmp_path / "c" / "checkpoint"
    read_checkpoint_meta(good)  # complete and verified

    partial = tmp_path / "partial"
    shutil.copytree(good, partial)
    (partial / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="save did not finish"):
        read_checkpoint_meta(partial)

    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    shard = next(p for p in truncated.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_checkpoint_meta(truncated)

    flipped = tmp_path / "flipped"
    shutil.copytree(good, flipped)
    shard = next(p for p in flipped.iterdir() if p.suffix == ".distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        read_checkpoint_meta(flipped)

    # The CLI refuses it with the message, before touching the model.
    ev = _cli("evaluate", "--config", str(cfg), "--checkpoint", str(flipped))
    assert ev.returncode == 2 and "corrupted" in ev.stderr and "Traceback" not in ev.stderr


def test_a_crash_during_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    """A stale ``checkpoint.tmp`` (what a save killed half-way leaves) never replaces the complete one."""
    from din_torchrec.training.checkpoint import save_checkpoint

    model = torch.nn.Linear(3, 2)
    path = tmp_path / "checkpoint"
    save_checkpoint(path, model, {"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tmp = tmp_path / "checkpoint.tmp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"half a shard")
    assert read_checkpoint_meta(path)["step"] == 1
    with torch.no_grad():
        model.weight.add_(1.0)
    save_checkpoint(path, model, {"step": 2})
    assert read_checkpoint_meta(path)["step"] == 2 and not tmp.exists()
    from din_torchrec.training.checkpoint import load_checkpoint

    fresh = torch.nn.Linear(3, 2)
    load_checkpoint(path, fresh)
    torch.testing.assert_close(fresh.weight, before["weight"] + 1.0)


def test_rng_state_round_trips_through_json() -> None:
    import json
    import random

    import numpy as np

    from din_torchrec.training.trainer import rng_state, set_rng_state

    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    saved = json.loads(json.dumps(rng_state()))  # what meta.json holds
    first = (torch.rand(4), np.random.rand(3), random.random())
    set_rng_state(saved)
    again = (torch.rand(4), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
