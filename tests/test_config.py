"""Strict YAML configs: unknown keys, wrong types, missing values and overrides."""

from pathlib import Path

import pytest

from din_torchrec.config import ConfigError, ExperimentConfig, load_config

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_load_and_validate() -> None:
    cfg = load_config(None)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.model.name == "din"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path: Path) -> None:
    load_config(path)


def test_unknown_key_is_named_with_its_path(tmp_path: Path) -> None:
    p = _write(tmp_path, "training:\n  lr_dens: 0.1\n")
    with pytest.raises(ConfigError, match=r"training\.lr_dens: unknown key"):
        load_config(p)


def test_wrong_type_names_key_and_expectation(tmp_path: Path) -> None:
    p = _write(tmp_path, "data:\n  batch_size: many\n")
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected int, got 'many'"):
        load_config(p)
    p = _write(tmp_path, "model:\n  name: transformer\n")
    with pytest.raises(ConfigError, match=r"model\.name: expected one of 'base', 'din'"):
        load_config(p)


def test_missing_required_value_in_a_list_item(tmp_path: Path) -> None:
    p = _write(tmp_path, "features:\n  sequence:\n    - {name: item, num_embeddings: 10, target_column: t}\n")
    with pytest.raises(ConfigError, match=r"features\.sequence\[0\]\.history_column: required value missing"):
        load_config(p)


def test_overrides_apply_and_are_checked(tmp_path: Path) -> None:
    cfg = load_config(None, ["training.lr_dense=0.01", "model.mlp_hidden=[64, 32]", "model.name=base"])
    assert cfg.training.lr_dense == 0.01
    assert cfg.model.mlp_hidden == [64, 32]
    assert cfg.model.name == "base"
    with pytest.raises(ConfigError, match=r"training\.epoch: unknown key"):
        load_config(None, ["training.epoch=3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["training.epochs"])


def test_cross_field_checks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of 4"):
        load_config(None, ["features.embedding_dim=6"])
    with pytest.raises(ConfigError, match=r"training\.sharding\.items: no such table"):
        load_config(None, ["training.sharding={items: {sharding_types: [row_wise]}}"])
    with pytest.raises(ConfigError, match=r"data\.batch_size: expected a positive integer"):
        load_config(None, ["data.batch_size=0"])


def test_unreadable_and_invalid_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    p = _write(tmp_path, "training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(p)
