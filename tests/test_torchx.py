"""TorchX launching: the components pass config, overrides and plan through; local_cwd jobs run for real.

* 1 host x 2 processes (``-j 1x2``) training from a plan saved by ``din-torchrec plan``;
* 2 hosts x 1 process (``-j 2x1``) simulated on loopback: train, then evaluate the checkpoint;
* the Slurm dry run renders an sbatch script.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from din_torchrec.config import dump_config
from din_torchrec.distributed.planning import load_topology, plan_for_topology, save_plan
from tests.conftest import small_experiment

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = "launch/components.py"
BIN = Path(sys.executable).parent


def _components():
    spec = importlib.util.spec_from_file_location("din_launch_components", ROOT / COMPONENTS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torchx(*args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # torchrun of this venv
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [str(BIN / "torchx"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(tmp_path: Path, data_dir: Path, out_dir: Path, steps: int = 4) -> Path:
    cfg = small_experiment(data_dir, out_dir, "din")
    cfg.training.epochs = 1
    cfg.training.max_steps_per_epoch = steps
    cfg.training.log_every = 2
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    return path


def _role_command(app) -> str:
    (role,) = app.roles
    assert role.entrypoint == "bash"
    return role.args[-1]


def test_components_pass_config_overrides_and_plan_through() -> None:
    c = _components()
    cmd = _role_command(
        c.train("training.epochs=1", "model.mlp_hidden=[64,32]", config="cfg.yaml", plan="plan.json", j="2x4")
    )
    assert "torchrun" in cmd and "--nnodes 2" in cmd and "--nproc_per_node 4" in cmd
    assert (
        "-m din_torchrec.cli train --config cfg.yaml --set training.epochs=1 "
        "--set 'model.mlp_hidden=[64,32]' --set training.plan_path=plan.json"
    ) in cmd
    app = c.evaluate(config="cfg.yaml", checkpoint="ck", output="m.json", j="1x2")
    assert "-m din_torchrec.cli evaluate --config cfg.yaml --checkpoint ck --output m.json" in _role_command(
        app
    )
    assert app.roles[0].env["OMP_NUM_THREADS"] == "1"
    cmd = _role_command(c.plan(config="big.yaml", topology="topo.yaml", out="p.json", report_json="r.json"))
    assert "--nproc_per_node 1" in cmd
    assert (
        "-m din_torchrec.cli plan --config big.yaml --topology topo.yaml --out p.json --report-json r.json"
        in cmd
    )
    cmd = _role_command(c.bench("data.batch_size=256", "--what", "embedding", config="cfg.yaml"))
    assert "-m din_torchrec.cli bench --config cfg.yaml --set data.batch_size=256 --what embedding" in cmd
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        c.train("training.epochs")


def test_torchxconfig_defaults() -> None:
    parser = configparser.ConfigParser()
    assert parser.read(ROOT / ".torchxconfig")
    assert parser["cli:run"]["scheduler"] == "local_cwd"
    assert parser["cli:run"]["component"] == f"{COMPONENTS}:train"
    for name in ("train", "evaluate", "plan", "bench"):
        assert f"component:{COMPONENTS}:{name}" in parser
    assert (ROOT / parser[f"component:{COMPONENTS}:train"]["config"]).exists()
    assert (ROOT / parser[f"component:{COMPONENTS}:plan"]["topology"]).exists()


def test_slurm_dry_run_renders_an_sbatch_script() -> None:
    r = _torchx(
        "run", "--dryrun", "-s", "slurm", f"{COMPONENTS}:train",
        "--config", "configs/demo.yaml", "-j", "2x8", "--gpu", "8", "--", "training.epochs=1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "#SBATCH" in r.stdout
    assert "din_torchrec.cli train --config configs/demo.yaml --set training.epochs=1" in r.stdout


@pytest.mark.slow
def test_local_cwd_one_host_two_processes_from_a_saved_plan(tmp_path: Path, small_dataset: Path) -> None:
    out = tmp_path / "run"
    cfg_path = _config(tmp_path, small_dataset, out)
    from din_torchrec.config import load_config

    plan_path = tmp_path / "plan.json"
    result = plan_for_topology(load_config(cfg_path), load_topology(ROOT / "configs/topologies/cpu_2.yaml"))
    save_plan(plan_path, result)
    r = _torchx(
        "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}", f"{COMPONENTS}:train",
        "--config", str(cfg_path), "-j", "1x2", "--plan", str(plan_path),
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-6000:])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["steps"] == 4
    assert metrics["final"]["samples"] == 12_000
    assert metrics["config"]["training"]["plan_path"] == str(plan_path)
    used = {row["table"]: row["sharding_type"] for row in json.loads((out / "plan.json").read_text())}
    planned = {row["table"]: row["sharding_type"] for row in result.report["tables"]}
    assert used == planned, "the job shards with the saved plan"


@pytest.mark.slow
def test_local_cwd_two_hosts_one_process_each_train_and_evaluate(tmp_path: Path, small_dataset: Path) -> None:
    out = tmp_path / "run"
    cfg_path = _config(tmp_path, small_dataset, out)
    common = ["-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}"]
    r = _torchx(
        "run", *common, f"{COMPONENTS}:train", "--config", str(cfg_path), "-j", "2x1",
        "--rdzv_port", str(_free_port()), "--", "training.seed=1",
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-6000:])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    assert metrics["config"]["training"]["seed"] == 1
    assert (out / "checkpoint").is_dir()

    eval_path = tmp_path / "eval.json"
    r = _torchx(
        "run", *common, f"{COMPONENTS}:evaluate", "--config", str(cfg_path), "-j", "2x1",
        "--rdzv_port", str(_free_port()), "--output", str(eval_path), "--", "training.seed=1",
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-6000:])
    evaluated = json.loads(eval_path.read_text())
    assert evaluated["samples"] == 12_000
    # Same ranks, reloaded weights (the evaluation plans for its own batch size): AUC agrees up to float
    # summation order (seen: 1.2e-6 apart).
    assert evaluated["auc"] == pytest.approx(metrics["final"]["auc"], abs=1e-4)
