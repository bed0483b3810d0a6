"""Building and loading the native kernels: the fallback to the PyTorch paths without a compiler or after a
failed build (logged once, every caller still works), the switches, and the build tag following the sources."""

from __future__ import annotations

import logging

import pytest
import torch

from din_torchrec.modules.activations import Dice
from din_torchrec.modules.recurrence import PackedRecurrence, _recurrence_function
from din_torchrec.ops import native


def _formula(x: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    mean, var = x.mean(0), x.var(0, unbiased=False)
    p = torch.sigmoid((x - mean) / torch.sqrt(var + eps))
    return x * (alpha + (1 - alpha) * p)


def test_without_a_compiler_everything_runs_its_pytorch_path(monkeypatch, caplog) -> None:
    monkeypatch.setattr(native, "_state", {"enabled": True, "module": None})
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.kernels() is None
    assert "no C++ compiler" in caplog.text
    torch.manual_seed(3)
    d = Dice(4)
    x = torch.randn(100, 4) * 3
    torch.testing.assert_close(d(x), _formula(x, d.alpha.detach(), 1e-8), rtol=1e-5, atol=1e-5)
    assert _recurrence_function(torch.randn(3, 6)) is PackedRecurrence


def test_a_failed_build_is_reported_once_and_not_retried(monkeypatch, caplog) -> None:
    import torch.utils.cpp_extension as cpp

    monkeypatch.setattr(native, "_state", {"enabled": True, "module": None})
    builds: list[str] = []

    def broken(**kwargs):
        builds.append(kwargs["name"])
        raise RuntimeError("compiler exploded")

    monkeypatch.setattr(cpp, "load", broken)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.kernels() is None
        assert native.kernels() is None
    assert len(builds) == 1 and "compiler exploded" in caplog.text
    assert not native.usable(torch.randn(40, 3))


def test_switches_and_unsupported_inputs(monkeypatch) -> None:
    monkeypatch.setattr(native, "_state", {"enabled": True, "module": native._state["module"]})
    assert not native.usable(torch.randn(40, 3, dtype=torch.float64))
    assert not native.usable(torch.randn(40, 3).bfloat16())  # float32 unless the caller allows more
    native.set_enabled(False)
    assert native.kernels() is None and not native.usable(torch.randn(40, 3))
    monkeypatch.setenv("DIN_TORCHREC_NATIVE_KERNELS", "0")
    native.set_enabled(True)  # the environment wins
    assert native.kernels() is None


def test_the_build_tag_changes_with_any_source(monkeypatch, tmp_path) -> None:
    for name in native._SOURCES:
        (tmp_path / name).write_bytes((native._DIR / name).read_bytes())
    monkeypatch.setattr(native, "_DIR", tmp_path)
    tag = native._build_tag()
    header = tmp_path / "recurrence_kernel.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert native._build_tag() != tag


def test_ninja_from_the_wheel_is_put_on_path_when_the_venv_is_not_activated(monkeypatch, tmp_path) -> None:
    import sys
    import types

    found: list[str] = []

    def which(name: str, path: str | None = None) -> str | None:
        if name == "ninja" and str(tmp_path) in native.os.environ["PATH"].split(native.os.pathsep):
            found.append(name)
            return str(tmp_path / "ninja")
        return None

    monkeypatch.setattr(native.shutil, "which", which)
    monkeypatch.setenv("PATH", "/nowhere")
    monkeypatch.setitem(sys.modules, "ninja", types.SimpleNamespace(BIN_DIR=str(tmp_path)))
    assert native._ensure_ninja() and found == ["ninja"]
    monkeypatch.setitem(sys.modules, "ninja", None)  # the wheel missing too
    monkeypatch.setenv("PATH", "/nowhere")
    assert not native._ensure_ninja()


def test_missing_kernel_sources_fall_back_with_a_warning(monkeypatch, tmp_path, caplog) -> None:
    """An install without the ``.cpp`` / ``.h`` files (package data) warns and keeps the PyTorch paths."""
    monkeypatch.setattr(native, "_state", {"enabled": True, "module": None})
    monkeypatch.setattr(native, "_DIR", tmp_path)  # empty: no sources
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.kernels() is None
    assert "build failed" in caplog.text and "native.cpp" in caplog.text


def test_the_kernel_sources_are_package_data() -> None:
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(native.__file__).parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["din_torchrec"]
    for name in native._SOURCES:
        assert any(Path("ops", name).match(p) for p in patterns), name


def test_the_kernels_run_on_torchs_intra_op_threads() -> None:
    """The extension is built with OpenMP, so at::parallel_for inside the kernels uses torch.set_num_threads'
    threads (built without it, every kernel ran on one thread whatever the setting)."""
    kernels = native.kernels()
    if kernels is None:
        pytest.skip("the native kernels did not build")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert kernels.parallel_threads(64) == 1
        torch.set_num_threads(2)
        assert kernels.parallel_threads(64) == 2
    finally:
        torch.set_num_threads(before)
