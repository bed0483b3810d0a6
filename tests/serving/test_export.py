"""The exported artefact loads with torch alone (din_torchrec blocked) and reproduces the scores."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from din_torchrec.serving.cli import register
from din_torchrec.serving.export import INPUT_NAMES, ServingModule, export_model, padded_inputs
from din_torchrec.serving.predictor import Predictor
from tests.serving.conftest import MAX_HISTORY, random_model, tiny_config
from tests.serving.test_predictor import _request

MODELS = ("din", "dien", "dsin")

LOADER = textwrap.dedent(
    """
    import json, sys

    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "din_torchrec" or name.startswith("din_torchrec."):
                raise ImportError("the artefact must load without din_torchrec")

    sys.meta_path.insert(0, _Block())
    import torch

    for name in sys.argv[2:]:
        extra = {"serving.json": ""}
        program = torch.export.load(f"{sys.argv[1]}/{name}.pt2", extra_files=extra)
        spec = json.loads(extra["serving.json"])
        inputs = torch.load(f"{sys.argv[1]}/{name}.inputs.pt")
        module = program.module()
        with torch.no_grad():
            full = module(*[inputs[k] for k in spec["inputs"]])
            # Other batch and candidate counts than traced, including one of each.
            one = module(*[inputs[k][:1] for k in spec["inputs"][:-1]], inputs["candidate_ids"][:1, :1])
        torch.save({"full": full, "one": one, "spec": spec}, f"{sys.argv[1]}/{name}.out.pt")
    print("din_torchrec" in sys.modules)
    """
)


def test_exported_artefact_reproduces_the_scores(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """DIN: the trained checkpoint through ``din-torchrec export``; DIEN, DSIN: random weights."""
    expected = {}
    for name in MODELS:
        if name == "din":
            argv = ["export", "--run", str(trained_run), "-o", str(tmp_path / "din.pt2")]
            parser = argparse.ArgumentParser(prog="din-torchrec")
            register(parser.add_subparsers(dest="command", required=True))
            args = parser.parse_args(argv)
            assert args.func(args) == 0
            assert json.loads(capsys.readouterr().out)["artefact"].endswith("din.pt2")
            pred = Predictor.from_checkpoint(trained_run)
            cfg, model = pred.cfg, pred.model
        else:
            cfg = tiny_config(name)
            model = random_model(cfg)
            pred = Predictor(model, cfg)
        t_max = cfg.data.max_history
        bodies = [_request(cfg, 5, t, seed=t, user=t) for t in (0, 3, t_max, 7)]
        prepared = [pred.prepare(b) for b in bodies]
        expected[name] = np.stack([r.logits for r in pred.rank_prepared(prepared)])
        inputs = padded_inputs(prepared, t_max, len(cfg.features.profile))
        # The eager module is the exported code: same scores before export too.
        with torch.no_grad():
            eager = ServingModule(model, cfg)(*inputs).double().numpy()
        np.testing.assert_allclose(eager, expected[name], rtol=1e-5, atol=1e-6)
        if name != "din":
            export_model(model, cfg, tmp_path / f"{name}.pt2")
        torch.save(dict(zip(INPUT_NAMES, inputs)), tmp_path / f"{name}.inputs.pt")

    script = tmp_path / "load.py"
    script.write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path), *MODELS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "False"
    for name in MODELS:
        out = torch.load(tmp_path / f"{name}.out.pt")
        assert out["spec"]["model"] == name
        assert out["spec"]["max_history"] == (30 if name == "din" else MAX_HISTORY)
        np.testing.assert_allclose(out["full"].double().numpy(), expected[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["one"].double().numpy(), expected[name][:1, :1], rtol=1e-5, atol=1e-6)
