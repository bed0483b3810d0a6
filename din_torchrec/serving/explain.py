"""Which behaviours the model attended to: attention weights per candidate, as JSON and as a heatmap.

* DIN: the local activation unit's weight of every history behaviour (raw, as the DIN paper keeps them, or
  softmax-normalised, per ``model.attention_normalization``);
* DIEN: the attention over the interest-evolution steps (softmax over the history, one step per behaviour),
  the gate of the AUGRU;
* DSIN: the attention over the sessions, from the candidate to the session interests (``sessions``) and to
  the Bi-LSTM states (``session_states``), both softmax over the kept sessions; ``session_of_position`` maps
  each history behaviour to its session slot (-1: dropped, outside the ``max_sessions`` most recent
  sessions or the ``max_session_length`` most recent behaviours of its session).

The weights are those the serving path computes, which equal ``ModelOutput.attention`` of the training
model for the same inputs (tests). The heatmap has one row per candidate (best first) and one column per
history position (oldest left), labelled with item and category ids; DSIN's session weights are spread over
the positions of each session.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from din_torchrec.models.dien import DIEN
from din_torchrec.models.din import DIN
from din_torchrec.models.dsin import DSIN
from din_torchrec.modules.sessions import sessionize
from din_torchrec.serving.requests import PreparedRequest, make_request


@dataclass
class Explanation:
    """Attention of one user's request.

    Attributes:
        model: ``din``, ``dien``, ``dsin`` or ``base``.
        user_id: the user.
        history: sequence table -> the kept history ids (oldest first); ``timestamps`` beside them.
        candidates: sequence table -> candidate ids (request order).
        scores: ``[N]`` click probabilities; ``order`` best first.
        attention: map name -> ``[N, T]`` (per history position) or ``[N, K]`` (per session slot).
        normalization: map name -> ``softmax`` (rows sum to 1 over real positions / sessions) or ``none``.
        session_of_position: DSIN only, ``[T]`` session slot of each behaviour (-1: not kept).
    """

    model: str
    user_id: int
    history: dict[str, list[int]]
    timestamps: list[int]
    candidates: dict[str, list[int]]
    scores: np.ndarray
    order: np.ndarray
    attention: dict[str, np.ndarray]
    normalization: dict[str, str]
    session_of_position: np.ndarray | None = None
    truncated: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def per_position(self, name: str) -> np.ndarray:
        """``[N, T]`` weights of map ``name`` per history position (DSIN: each behaviour gets its session's
        weight, NaN where it was not kept)."""
        a = self.attention[name]
        if self.session_of_position is None:
            return a
        slots = self.session_of_position
        out = np.full((a.shape[0], slots.shape[0]), np.nan)
        kept = slots >= 0
        out[:, kept] = a[:, slots[kept]]
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "user_id": self.user_id,
            "history": {**self.history, "timestamps": self.timestamps},
            "truncated": self.truncated,
            "candidates": self.candidates,
            "scores": [float(s) for s in self.scores],
            "order": [int(i) for i in self.order],
            "attention": {k: v.tolist() for k, v in self.attention.items()},
            "normalization": self.normalization,
        }
        if self.session_of_position is not None:
            out["session_of_position"] = self.session_of_position.tolist()
        return out

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1))
        return path

    def plot(self, path: str | Path, max_rows: int = 40) -> Path:
        """Heatmap PNG: candidates (best first, at most ``max_rows``) x history positions."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.attention)
        if not names:
            raise ValueError(f"model {self.model!r} has no attention to plot")
        rows = self.order[:max_rows]
        tables = list(self.history)
        t = len(self.timestamps)
        x_labels = [
            "/".join(f"{tb[0]}{self.history[tb][j]}" for tb in tables)
            + (_slot_label(self.session_of_position[j]) if self.session_of_position is not None else "")
            for j in range(t)
        ]
        y_labels = [
            "/".join(f"{tb[0]}{self.candidates[tb][i]}" for tb in tables) + f"  p={self.scores[i]:.3f}"
            for i in rows
        ]
        width = min(4 + 0.32 * max(t, 1), 40)
        height = (1.5 + 0.28 * len(rows)) * len(names) + 1
        fig, axes = plt.subplots(len(names), 1, figsize=(width, height), squeeze=False)
        for ax, name in zip(axes[:, 0], names):
            data = self.per_position(name)[rows] if t else np.zeros((len(rows), 1))
            im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap="viridis", interpolation="nearest")
            ax.set_yticks(range(len(rows)), y_labels, fontsize=7)
            ax.set_xticks(range(t), x_labels, rotation=90, fontsize=6)
            ax.set_xlabel(
                "history position (oldest left): item/category"
                + (", session slot" if self.session_of_position is not None else "")
            )
            ax.set_title(
                f"{self.model} attention '{name}' ({self.normalization[name]}), user {self.user_id}",
                fontsize=9,
            )
            fig.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def session_slots(prepared: PreparedRequest, model: DSIN) -> np.ndarray:
    """``[T]`` DSIN session slot of each kept behaviour (-1: dropped), from the model's own sessionizer."""
    it = model.interaction
    t = prepared.history_length
    values = torch.arange(1, t + 1, dtype=torch.float64).unsqueeze(1)
    ts = torch.from_numpy(prepared.timestamps)
    sessions, mask, _ = sessionize(
        values, ts, torch.tensor([t]), it.gap_seconds, it.max_sessions, it.max_session_len
    )
    out = np.full(t, -1, dtype=np.int64)
    k_idx, l_idx = torch.nonzero(mask[0], as_tuple=True)
    positions = sessions[0, k_idx, l_idx, 0].long() - 1
    out[positions.numpy()] = k_idx.numpy()
    return out


def explain_prepared(predictor, prepared: PreparedRequest) -> Explanation:
    """The :class:`Explanation` of one validated request."""
    model = predictor.model
    ranking = predictor.rank_prepared([prepared], attention=True)[0]
    seq = [t.name for t in predictor.features.sequence]
    if isinstance(model, DIN):
        name, normalization = "din", {"history": model.attention.normalization}
    elif isinstance(model, DIEN):
        name, normalization = "dien", {"evolution": "softmax"}
    elif isinstance(model, DSIN):
        name, normalization = "dsin", {"sessions": "softmax", "session_states": "softmax"}
    else:
        name, normalization = predictor.cfg.model.name, {}
    return Explanation(
        model=name,
        user_id=prepared.user_id,
        history={n: prepared.history[j].tolist() for j, n in enumerate(seq)},
        timestamps=prepared.timestamps.tolist(),
        candidates={n: prepared.candidates[j].tolist() for j, n in enumerate(seq)},
        scores=ranking.scores,
        order=ranking.order,
        attention=ranking.attention or {},
        normalization=normalization,
        session_of_position=session_slots(prepared, model) if isinstance(model, DSIN) else None,
        truncated=prepared.truncated,
    )


def explain(
    predictor,
    user: int | Mapping[str, Any],
    history: Mapping[str, Any],
    candidates: Mapping[str, Any],
    *,
    profile: Mapping[str, Any] | None = None,
    timestamps: Any = None,
    history_version: str | int | None = None,
) -> Explanation:
    """:meth:`Predictor.rank`'s arguments -> :class:`Explanation`."""
    request = make_request(
        user, history, candidates, profile=profile, timestamps=timestamps, history_version=history_version
    )
    return explain_prepared(predictor, predictor.prepare(request))


def _slot_label(slot: int) -> str:
    return f" s{slot}" if slot >= 0 else " (dropped)"
