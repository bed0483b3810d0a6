"""Offline planning: topology files, the 2B + 1B-row catalog on 64 GPUs, plans that do not fit, saved plans.

The catalog plan runs on the meta device (no table is allocated) and takes about a second; the last test
trains 2 gloo ranks from a saved plan and checks them against one unsharded process.
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from din_torchrec.config import ConfigError, dump_config, load_config
from din_torchrec.distributed import plan_cli, sharding
from din_torchrec.distributed.env import exits_without_finalization
from din_torchrec.distributed.planning import (
    PlanDoesNotFit,
    PlanFileError,
    format_report,
    load_plan,
    load_topology,
    plan_for_topology,
    plan_to_dict,
    save_plan,
)
from tests.distributed import test_sharded_equivalence as eq

ROOT = Path(__file__).resolve().parents[2]
CATALOG = ROOT / "configs" / "din_2b_catalog.yaml"
TOPOLOGIES = ROOT / "configs" / "topologies"
GPU64 = TOPOLOGIES / "gpu_64x8_h100.yaml"
UVM8 = TOPOLOGIES / "gpu_8x1_a100_40g_uvm.yaml"
CPU2 = TOPOLOGIES / "cpu_2.yaml"


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------------------
# Topology files
# ---------------------------------------------------------------------------------------------------------


def test_shipped_topologies_parse() -> None:
    files = sorted(TOPOLOGIES.glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        topo = load_topology(f)
        assert topo.world_size % topo.devices_per_host == 0
        assert topo.name == f.stem


@pytest.mark.parametrize(
    "text,expected",
    [
        ("world_size: 8\ndevices_per_host: 8\nhbm_gb: 80\n", "hbm_gb: unknown key"),
        ("world_size: 8\ndevices_per_host: 8\nhbm_gib: lots\n", "hbm_gib: expected float"),
        ("devices_per_host: 8\n", "world_size: required value missing"),
        ("world_size: 12\ndevices_per_host: 8\n", "devices_per_host: expected a positive divisor"),
        ("world_size: 8\ndevices_per_host: 8\ncompute_device: tpu\n", "compute_device: expected one of"),
        (
            "world_size: 2\ndevices_per_host: 2\ncompute_device: cpu\n"
            "planning: {tables: {item: {compute_kernels: [fused_uvm_caching]}}}\n",
            "needs GPUs",
        ),
        (
            "world_size: 8\ndevices_per_host: 8\nplanning: {tables: {item: {cache_load_factor: 1.5}}}\n",
            "planning.tables.item.cache_load_factor: expected in (0, 1]",
        ),
        (
            "world_size: 8\ndevices_per_host: 8\nplanning: {tables: {item: {sharding_types: [diagonal]}}}\n",
            "planning.tables.item.sharding_types[0]: expected one of",
        ),
    ],
)
def test_topology_file_is_parsed_strictly(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        load_topology(_write(tmp_path, "t.yaml", text))
    assert expected in str(info.value)
    assert "t.yaml" in str(info.value), "the error names the file"


def test_planning_tables_must_name_model_tables() -> None:
    cfg = eq.small_config("din", "row_wise")
    topo = load_topology(CPU2, ["planning.tables={items: {sharding_types: [row_wise]}}"])
    with pytest.raises(ConfigError, match=r"planning\.tables\.items: no such table"):
        plan_for_topology(cfg, topo)


# ---------------------------------------------------------------------------------------------------------
# The 2B + 1B-row catalog
# ---------------------------------------------------------------------------------------------------------


def _assert_within_capacity(report: dict) -> None:
    for r in report["ranks"]:
        assert r["hbm_used_bytes"] <= r["hbm_capacity_bytes"], r
        assert r["ddr_used_bytes"] <= r["ddr_capacity_bytes"], r
        assert r["hbm_used_bytes"] == r["hbm_tables_bytes"] + r["hbm_reserved_bytes"]


def test_catalog_plans_on_64_gpus_without_allocating_tables(tmp_path: Path) -> None:
    cfg = load_config(CATALOG)
    assert {t.name: t.num_embeddings for t in cfg.features.sequence}["item"] == 2_000_000_000
    assert {p.name: p.num_embeddings for p in cfg.features.profile}["user"] == 1_000_000_000
    assert cfg.features.embedding_dim == 64
    topo = load_topology(GPU64)
    rss_before = _peak_rss_bytes()
    result = plan_for_topology(cfg, topo)
    grown = _peak_rss_bytes() - rss_before
    report = result.report
    print(
        f"\n2B+1B catalog on 64 GPUs: planned in {report['planning_seconds']:.2f} s "
        f"(+{report['build_seconds']:.2f} s building the meta model); most used rank "
        f"{report['max_hbm_used_bytes'] / 2**30:.2f} GiB HBM of 80; peak RSS grew {grown / 2**20:.0f} MiB"
    )
    assert grown < 1024**3, "the tables (0.78 TB) must stay on the meta device"
    assert report["planning_seconds"] < 60
    assert report["world_size"] == 64
    tables = {row["table"]: row for row in report["tables"]}
    assert set(tables) == {"item", "category", "user", "age", "gender"}
    item, user = tables["item"], tables["user"]
    # 2e9 x 64 fp32 + row-wise Adagrad state = 520 GB: no single GPU holds it.
    assert item["num_shards"] >= 8 and len(set(item["ranks"])) >= 8
    assert user["num_shards"] >= 4
    assert item["hbm_bytes"] + item["ddr_bytes"] >= 2_000_000_000 * (64 * 4 + 4)
    assert all(0 <= r < 64 for row in report["tables"] for r in row["ranks"])
    _assert_within_capacity(report)

    text = format_report(report)
    for needle in ("item", "2,000,000,000", "row_wise", "HBM used / capacity", "planner cost estimate"):
        assert needle in text

    path = save_plan(tmp_path / "plan.json", result)
    loaded = load_plan(path, world_size=64, features=cfg.features, compute_device="cuda")
    assert plan_to_dict(loaded, 64, 8, "cuda") == plan_to_dict(result.plan, 64, 8, "cuda")
    saved = json.loads(path.read_text())
    assert saved["tables"]["item"] == {
        "module": "sequence_embeddings",
        "num_embeddings": 2_000_000_000,
        "embedding_dim": 64,
    }


def test_big_tables_cache_in_hbm_when_it_is_short() -> None:
    cfg = load_config(CATALOG)
    result = plan_for_topology(cfg, load_topology(UVM8))
    tables = {row["table"]: row for row in result.report["tables"]}
    for name in ("item", "user"):
        assert tables[name]["compute_kernel"] == "fused_uvm_caching", tables[name]
        assert tables[name]["cache_load_factor"] == pytest.approx(0.1)
        assert tables[name]["ddr_bytes"] > tables[name]["hbm_bytes"] > 0
    _assert_within_capacity(result.report)
    assert "fused_uvm_caching (cache 0.1)" in format_report(result.report)
    cache = result.plan.plan["sequence_embeddings"]["item"].cache_params  # type: ignore[index]
    assert cache is not None and cache.load_factor == pytest.approx(0.1)


def test_a_topology_too_small_names_the_table_and_the_rank() -> None:
    cfg = load_config(CATALOG)
    topo = load_topology(
        GPU64,
        [
            "world_size=8",
            "hbm_gib=40",
            "planning.tables={item: {compute_kernels: [fused]}, user: {compute_kernels: [fused]}}",
        ],
    )
    with pytest.raises(PlanDoesNotFit) as info:
        plan_for_topology(cfg, topo)
    message = str(info.value)
    overflow = info.value.report["overflow"]
    assert overflow["table"] == "item" and 0 <= overflow["rank"] < 8
    assert overflow["need_bytes"] > overflow["free_bytes"]
    assert f"Table 'item' overflows rank {overflow['rank']}" in message
    assert "HBM" in message and "2,000,000,000" in message
    assert "fused_uvm_caching" in message, "the way out is named"


def test_cpu_ranks_too_small_name_the_table_and_the_rank() -> None:
    cfg = load_config(CATALOG)
    with pytest.raises(PlanDoesNotFit, match=r"Table 'item' overflows rank \d: .* host DRAM"):
        plan_for_topology(cfg, load_topology(CPU2))


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------


def test_plan_command_reports_and_saves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path = _write(tmp_path, "small.yaml", dump_config(eq.small_config("din", "row_wise", "row_wise")))
    out, report = tmp_path / "plan.json", tmp_path / "report.json"
    code = plan_cli.main(
        ["--config", str(cfg_path), "--topology", str(CPU2), "--out", str(out), "--report-json", str(report)]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert "Tables" in printed and "Ranks" in printed and "plan saved to" in printed
    data = json.loads(report.read_text())
    assert data["fits"] and data["world_size"] == 2 and data["compute_device"] == "cpu"
    assert {row["table"] for row in data["tables"]} == {"item", "category", "user", "age"}
    assert {row["sharding_type"] for row in data["tables"]} == {"row_wise"}
    load_plan(out, world_size=2, compute_device="cpu")


def test_plan_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "fail.json"
    code = plan_cli.main(["--config", str(CATALOG), "--topology", str(CPU2), "--report-json", str(report)])
    assert code == 1
    assert "Table 'item' overflows rank" in capsys.readouterr().err
    assert json.loads(report.read_text())["fits"] is False
    assert plan_cli.main(["--config", str(CATALOG), "--topology", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read topology file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Loading plans
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = eq.small_config("din", "row_wise", "row_wise")
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    save_plan(path, plan_for_topology(cfg, load_topology(CPU2)))
    return path


def test_load_plan_checks_world_size_device_and_tables(cpu_plan: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanFileError, match="made for 2 ranks but this job has 4"):
        load_plan(cpu_plan, world_size=4, compute_device="cpu")
    with pytest.raises(PlanFileError, match="compute device 'cpu' but this job runs on 'cuda'"):
        load_plan(cpu_plan, world_size=2, compute_device="cuda")
    if not torch.cuda.is_available():
        data = json.loads(cpu_plan.read_text())
        data["compute_device"] = "cuda"
        with pytest.raises(PlanFileError, match="made for compute device 'cuda' but this machine has no GPU"):
            load_plan(_write(tmp_path, "gpu.json", json.dumps(data)), world_size=2)
    other = eq.small_config("din", "row_wise", "row_wise")
    other.features.sequence[0].num_embeddings = 301
    with pytest.raises(PlanFileError, match="table 'item' was planned as 300 x 8 but the model has 301 x 8"):
        load_plan(cpu_plan, world_size=2, features=other.features, compute_device="cpu")
    other.features.profile = other.features.profile[:1]
    with pytest.raises(PlanFileError, match=r"not in the model: \['age'\]"):
        load_plan(cpu_plan, world_size=2, features=other.features, compute_device="cpu")


@pytest.mark.parametrize(
    "content,expected",
    [
        ('[{"table": "item"}]', "plan summary a training run writes"),
        ("{not json", "not JSON"),
        ('{"format": "something"}', "not a plan written by"),
    ],
)
def test_load_plan_rejects_other_files(tmp_path: Path, content: str, expected: str) -> None:
    with pytest.raises(PlanFileError, match=expected):
        load_plan(_write(tmp_path, "plan.json", content), world_size=2, compute_device="cpu")
    with pytest.raises(PlanFileError, match="cannot read the plan"):
        load_plan(tmp_path / "missing.json", world_size=2)


def test_load_plan_rejects_unknown_keys_and_ranks(cpu_plan: Path, tmp_path: Path) -> None:
    data = json.loads(cpu_plan.read_text())
    entry = data["plan"]["sequence_embeddings"]["item"]
    entry["colour"] = "blue"
    with pytest.raises(PlanFileError, match=r"plan\.sequence_embeddings\.item\.colour: unknown key"):
        load_plan(_write(tmp_path, "a.json", json.dumps(data)), world_size=2, compute_device="cpu")
    del entry["colour"]
    entry["ranks"] = [0, 5]
    with pytest.raises(PlanFileError, match=r"ranks \[5\], outside 0\.\.1"):
        load_plan(_write(tmp_path, "b.json", json.dumps(data)), world_size=2, compute_device="cpu")


# ---------------------------------------------------------------------------------------------------------
# Training from a saved plan: 2 gloo ranks == 1 unsharded process
# ---------------------------------------------------------------------------------------------------------

_original_shard_model = sharding.shard_model


@exits_without_finalization
def _saved_plan_worker(rank: int, store: str, plan_path: str) -> None:
    def shard_from_file(model, env, features, training, batch_size, plan=None):
        loaded = load_plan(plan_path, world_size=env.world_size, features=features)
        dmp = _original_shard_model(model, env, features, training, batch_size, plan=loaded)
        for module_path, module_plan in loaded.plan.items():
            for table, ps in module_plan.items():
                used = dmp.plan.plan[module_path][table]
                assert (used.sharding_type, used.compute_kernel, used.ranks) == (
                    ps.sharding_type,
                    ps.compute_kernel,
                    ps.ranks,
                ), table
        return dmp

    eq.shard_model = shard_from_file
    eq._worker(rank, store, "din", "row_wise", "row_wise")


@pytest.mark.slow
def test_two_gloo_ranks_train_from_a_saved_plan(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cfg = eq.small_config("din", "row_wise", "row_wise")
    plan_path = tmp_path / "plan.json"
    result = plan_for_topology(cfg, load_topology(CPU2))
    save_plan(plan_path, result)
    assert {row["sharding_type"] for row in result.report["tables"]} == {"row_wise"}
    mp.spawn(_saved_plan_worker, args=(str(tmp_path / "store"), str(plan_path)), nprocs=eq.WORLD, join=True)
