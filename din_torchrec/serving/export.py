"""A serving artefact that runs without this package: ``torch.export`` of a module on plain padded tensors.

:class:`ServingModule` holds the embedding tables as plain tensors and the model's dense modules, and scores
``N`` candidates for each of ``B`` users from right-padded id tensors (no KeyedJaggedTensor, no FBGEMM op,
no data-dependent shape). :func:`export_model` traces it with :func:`torch.export.export` (dynamic ``B`` and
``N``, the history padded to exactly ``max_history``) and saves it with :func:`torch.export.save`; a
description of the inputs travels inside the file (``extra_files["serving.json"]``).

Loading needs only torch::

    import json, torch
    extra = {"serving.json": ""}
    program = torch.export.load("din.pt2", extra_files=extra)
    spec = json.loads(extra["serving.json"])          # table order, max_history, ...
    logits = program.module()(profile_ids, history_ids, history_timestamps, history_lengths, candidate_ids)

Inputs (int64), Q sequence tables and P profile columns in ``spec`` order, T = ``max_history``:

* ``profile_ids [B, P]``;
* ``history_ids [B, T, Q]``: each user's behaviours oldest first in positions ``0 .. length - 1``, any
  valid id (0) after them;
* ``history_timestamps [B, T]`` (unix seconds; read by DSIN only);
* ``history_lengths [B]`` (``<= T``; keep the most recent T behaviours);
* ``candidate_ids [B, N, Q]``.

Output: ``logits [B, N]`` (``sigmoid`` gives the click probability).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingCollection

from din_torchrec.config import ExperimentConfig
from din_torchrec.models.base import SequenceCTRModel
from din_torchrec.serving.requests import PreparedRequest
from din_torchrec.serving.scoring import DIENScorer, history_mask, make_scorer, repeat_gather

SPEC_FILE = "serving.json"
INPUT_NAMES = ("profile_ids", "history_ids", "history_timestamps", "history_lengths", "candidate_ids")


class ServingModule(nn.Module):
    """The model as one module on padded tensors (see the module docstring for the inputs).

    Args:
        model: a trained model of the family with fp32 TorchRec tables (the tables are copied out as plain
            tensors; the dense modules are shared).
        cfg: its experiment config.
        max_history: T, the padded history length (default ``cfg.data.max_history``).
    """

    def __init__(
        self, model: SequenceCTRModel, cfg: ExperimentConfig, max_history: int | None = None
    ) -> None:
        super().__init__()
        model = model.eval()
        self.scorer = make_scorer(model).eval()
        if isinstance(self.scorer, DIENScorer):
            self.scorer.use_scan = True
        self.max_history = int(max_history or cfg.data.max_history)
        ec = model.sequence_embeddings
        if not isinstance(ec, EmbeddingCollection):
            raise TypeError("ServingModule: export a model with fp32 TorchRec tables (not a quantized copy)")
        self.sequence_tables = [t.name for t in cfg.features.sequence]
        for name in self.sequence_tables:
            self.register_buffer(f"seq_{name}", ec.embeddings[name].weight.detach().clone())
        self.profile_columns = [p.column for p in cfg.features.profile]
        self.profile_tables = [p.name for p in cfg.features.profile]
        if model.profile_embeddings is not None:
            for name in self.profile_tables:
                w = model.profile_embeddings.embedding_bags[name].weight
                self.register_buffer(f"profile_{name}", w.detach().clone())
        self.model_name = cfg.model.name

    def _lookup(self, ids: torch.Tensor, prefix: str, names: list[str]) -> torch.Tensor:
        return torch.cat(
            [F.embedding(ids[..., j], getattr(self, f"{prefix}_{n}")) for j, n in enumerate(names)], dim=-1
        )

    def forward(
        self,
        profile_ids: torch.Tensor,
        history_ids: torch.Tensor,
        history_timestamps: torch.Tensor,
        history_lengths: torch.Tensor,
        candidate_ids: torch.Tensor,
    ) -> torch.Tensor:
        b, t, _ = history_ids.shape
        n = candidate_ids.shape[1]
        mask = history_mask(history_lengths, t)
        behaviours = self._lookup(history_ids * mask.unsqueeze(-1), "seq", self.sequence_tables)
        candidates = self._lookup(candidate_ids, "seq", self.sequence_tables).flatten(0, 1)
        profile = self._lookup(profile_ids, "profile", self.profile_tables) if self.profile_columns else None
        state = self.scorer.user_side_padded(behaviours, mask, history_timestamps)
        state["mask"] = mask
        logits, _ = self.scorer.logits(profile, state, repeat_gather(n), candidates)
        return logits.unflatten(0, (b, n))

    def spec(self) -> dict[str, Any]:
        """What a loader needs to build the inputs."""
        return {
            "format": "din_torchrec.serving/1",
            "model": self.model_name,
            "inputs": list(INPUT_NAMES),
            "sequence_tables": self.sequence_tables,
            "profile_columns": self.profile_columns,
            "max_history": self.max_history,
            "history_padding": "right (oldest first in 0..length-1)",
            "output": "logits [B, N]",
        }


def padded_inputs(
    prepared: Sequence[PreparedRequest], max_history: int, num_profile: int
) -> tuple[torch.Tensor, ...]:
    """The five input tensors of :class:`ServingModule` for validated requests with equal candidate counts.

    Histories longer than ``max_history`` keep their most recent part.
    """
    b = len(prepared)
    counts = {p.num_candidates for p in prepared}
    if len(counts) != 1:
        raise ValueError(
            f"padded_inputs: every request needs the same number of candidates, got {sorted(counts)}"
        )
    n = counts.pop()
    q = prepared[0].history.shape[0]
    prof = np.zeros((b, num_profile), dtype=np.int64)
    hist = np.zeros((b, max_history, q), dtype=np.int64)
    ts = np.zeros((b, max_history), dtype=np.int64)
    lengths = np.zeros(b, dtype=np.int64)
    cands = np.zeros((b, n, q), dtype=np.int64)
    for i, p in enumerate(prepared):
        h, t = p.history[:, -max_history:], p.timestamps[-max_history:]
        k = h.shape[1]
        prof[i] = p.profile
        hist[i, :k] = h.T
        ts[i, :k] = t
        lengths[i] = k
        cands[i] = p.candidates.T
    return tuple(torch.from_numpy(a) for a in (prof, hist, ts, lengths, cands))


def example_inputs(module: ServingModule, batch: int = 2, candidates: int = 3) -> tuple[torch.Tensor, ...]:
    """Valid inputs of the right shapes (ids 1, growing timestamps, full histories)."""
    t, q = module.max_history, len(module.sequence_tables)
    return (
        torch.zeros(batch, len(module.profile_columns), dtype=torch.int64),
        torch.ones(batch, t, q, dtype=torch.int64),
        torch.arange(t, dtype=torch.int64).repeat(batch, 1) * 60,
        torch.full((batch,), t, dtype=torch.int64),
        torch.ones(batch, candidates, q, dtype=torch.int64),
    )


def export_module(module: ServingModule) -> torch.export.ExportedProgram:
    """``torch.export`` with a dynamic batch B and candidate count N (T fixed to ``max_history``)."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    cands = torch.export.Dim("candidates", min=1, max=1 << 20)
    dynamic = (
        {0: batch},
        {0: batch},
        {0: batch},
        {0: batch},
        {0: batch, 1: cands},
    )
    with torch.no_grad(), warnings.catch_warnings():
        # nn.GRU / nn.LSTM re-assign their flat weight list while traced; harmless, and warned about.
        warnings.filterwarnings("ignore", message=".*_flat_weights.*")
        return torch.export.export(module.eval(), example_inputs(module), dynamic_shapes=dynamic)


def export_model(
    model: SequenceCTRModel, cfg: ExperimentConfig, path: str | Path, max_history: int | None = None
) -> Path:
    """Export ``model`` to ``path`` (``.pt2``) with its input spec inside; returns the path."""
    module = ServingModule(model, cfg, max_history)
    program = export_module(module)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path, extra_files={SPEC_FILE: json.dumps(module.spec())})
    return path


def load_exported(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """``(callable module, spec)`` of an artefact of :func:`export_model` (torch only)."""
    extra = {SPEC_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    return program.module(), json.loads(extra[SPEC_FILE])
