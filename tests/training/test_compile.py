"""``training.compile``: the compiled hot spots give the eager model's outputs, losses and gradients, in
training (Dice on batch statistics, > 32 rows so the fused path runs) and in evaluation, and the trainer wires
the option."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from din_torchrec.data.random_batch import random_batch
from din_torchrec.models import build_model
from din_torchrec.training.compile import compile_hot_paths
from tests.models.test_models import _config

HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="TorchInductor on the CPU needs a C++ compiler")


@needs_cxx
def test_compiled_dien_equals_eager_forward_backward_and_eval() -> None:
    torch.manual_seed(0)
    cfg = _config("dien")
    eager = build_model(cfg)
    compiled = copy.deepcopy(eager)
    names = compile_hot_paths(compiled)
    assert set(names) == {"evolution.unit.scores_jagged", "auxiliary.score_pairs", "top.forward"}
    for seed in (1, 2):  # two batches with different N: dynamic shapes, no wrong reuse of a graph
        batch = random_batch(cfg.features, 24, 20, torch.Generator().manual_seed(seed), with_negatives=True)
        assert int(batch.hist_lengths.sum()) > 32
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            out = model(batch)
            (out.logits.sum() + out.aux_loss).backward()
            outs.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (a, ga), (b, gb) = outs
        torch.testing.assert_close(b.logits, a.logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b.aux_loss, a.aux_loss, rtol=1e-4, atol=1e-5)
        assert ga.keys() == gb.keys()
        for n in ga:
            torch.testing.assert_close(gb[n], ga[n], rtol=1e-3, atol=1e-5, msg=n)
    for (n, buf), other in zip(eager.named_buffers(), compiled.buffers()):
        torch.testing.assert_close(other, buf, rtol=1e-4, atol=1e-6, msg=n)  # Dice's running estimates
    eager.eval()
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(batch).logits, eager(batch).logits, rtol=1e-4, atol=1e-5)
    # Nothing compiled is state: the state dicts hold the same keys.
    assert compiled.state_dict().keys() == eager.state_dict().keys()
