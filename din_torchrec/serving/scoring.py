"""The DIN family's forward split into a user side (once per request) and a candidate side (per candidate).

Every model of the family scores ``top([profile, c, interest(history, c)])``. Much of ``interest`` does not
depend on the candidate c, and a ranking request scores many candidates for one user:

* **DIN**: the local activation unit's first layer is split as in :mod:`din_torchrec.modules.attention`,
  ``W [b, c, b-c, b*c] = (W_b + W_d) b + (W_c - W_d) c + W_p (b*c)``; the behaviour-side product
  ``(W_b + W_d) b`` (``[T, H1]``) is computed once per user, only ``(W_c - W_d) c`` (``[N, H1]``) and the
  product term ``W_p (b*c)`` (``[N, T, H1]``) per candidate.
* **DIEN**: the GRU interest extractor (states ``h_t``), the evolution cell's input projection ``W h_t``
  and the unit's behaviour-side product on the states are per user; the attention scores and the AUGRU
  recurrence (whose update gate depends on the candidate's attention) run per candidate, batched over the
  candidates.
* **DSIN**: sessions, bias encoding, self-attention inside sessions and the Bi-LSTM across sessions are per
  user; the two target attentions over sessions run per candidate.
* **base**: the sum-pooled history is per user.

A *user state* is a dict of tensors. Fields named in :attr:`Scorer.history_fields` have one row per kept
history position (``[T_u, ...]``), the others a fixed shape. :func:`stack_states` pads a list of per-user
states into a batch ``[U, T_max, ...]``; :meth:`Scorer.candidate_side` then scores ``M`` candidates, each
owned by one of the U users (``owner [M]``), in one pass.

Two user sides exist:

* :meth:`Scorer.user_side_jagged` runs the model's own modules on the jagged histories (what the training
  model computes, used by the :class:`~din_torchrec.serving.predictor.Predictor`);
* :meth:`Scorer.user_side_padded` recomputes the same on a right-padded ``[U, T, S]`` block with plain torch
  ops and static shapes only (no ``nonzero``, no packed sequences, no FBGEMM ops), which is what
  :mod:`torch.export` needs (:mod:`din_torchrec.serving.export`).

The tests check both against ``model(batch)`` in eval mode. Everything here assumes eval mode (Dice uses its
running statistics and so acts row by row, which is what makes the split exact).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from din_torchrec.models.base import BaseModel, SequenceCTRModel
from din_torchrec.models.dien import DIEN
from din_torchrec.models.din import DIN
from din_torchrec.models.dsin import DSIN
from din_torchrec.modules.activations import Dice
from din_torchrec.modules.attention import LocalActivationUnit
from din_torchrec.modules.attention_family import masked_softmax
from din_torchrec.modules.mlp import MLP
from din_torchrec.modules.sessions import sessionize

State = dict[str, torch.Tensor]
Gather = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# The local activation unit, split
# --------------------------------------------------------------------------------------------------------


def activation_eval_(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An activation of the family in eval mode, in place on ``x`` where it can (``x`` must be a fresh
    temporary). Dice with its running statistics is ``x * (alpha + (1 - alpha) * sigmoid(x * a + b))`` with
    ``a = 1 / sqrt(var + eps)``, ``b = -mean * a``: four passes over ``x`` instead of eight (the candidate side
    applies it to ``[N * T, H]`` blocks, where these passes are most of the time)."""
    if isinstance(act, Dice):
        a = torch.rsqrt(act.running_var.clamp_min(0) + act.eps)
        p = torch.addcmul(-act.running_mean * a, x, a).sigmoid_()
        return x.mul_(p.mul_(1 - act.alpha).add_(act.alpha))
    if isinstance(act, nn.ReLU):
        return x.relu_()
    if isinstance(act, nn.Sigmoid):
        return x.sigmoid_()
    if isinstance(act, nn.PReLU) and x.dim() > 2:  # PReLU's channels are dim 1; the model feeds it [N, H]
        return act(x.flatten(0, -2)).view_as(x)
    return act(x)


def mlp_eval(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` in eval mode with :func:`activation_eval_` (same result within float rounding)."""
    for layer in mlp.layers:
        x = layer(x) if isinstance(layer, nn.Linear) else activation_eval_(layer, x)
    return x


def unit_key_projection(unit: LocalActivationUnit, keys: torch.Tensor) -> torch.Tensor:
    """The candidate-independent part of the unit's first layer, ``(W_b + W_d) k``: ``[..., D] -> [..., H1]``."""
    w_b, _, w_d, _ = unit.first.weight.split(unit.embedding_dim, dim=1)
    return keys @ (w_b + w_d).t()


def unit_scores(
    unit: LocalActivationUnit, keys: torch.Tensor, key_projection: torch.Tensor, queries: torch.Tensor
) -> torch.Tensor:
    """Scores of every key against its row's query with the key side precomputed.

    Args:
        keys: ``[M, T, D]``.
        key_projection: ``[M, T, H1]`` from :func:`unit_key_projection`.
        queries: ``[M, D]``, one candidate per row.

    Returns:
        ``[M, T]``, equal to ``unit.scores_reference`` on the aligned rows (within float rounding).
    """
    _, w_c, w_d, w_p = unit.first.weight.split(unit.embedding_dim, dim=1)
    query_part = torch.addmm(unit.first.bias, queries, (w_c - w_d).t())
    h = (keys * queries.unsqueeze(1)) @ w_p.t()
    h = h.add_(key_projection).add_(query_part.unsqueeze(1))
    scores = mlp_eval(unit.rest, activation_eval_(unit.first_activation, h.flatten(0, 1)))
    return scores.view(keys.shape[0], keys.shape[1])


# --------------------------------------------------------------------------------------------------------
# Padding per-user states into a batch
# --------------------------------------------------------------------------------------------------------


def history_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[U]`` lengths -> ``[U, max_len]`` bool, True at the first ``lengths[u]`` positions."""
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def pad_rows(rows: list[torch.Tensor], max_len: int) -> torch.Tensor:
    """Right-pad ``[T_u, ...]`` tensors with zeros to ``[U, max_len, ...]``."""
    first = rows[0]
    out = first.new_zeros((len(rows), max_len, *first.shape[1:]))
    for i, r in enumerate(rows):
        if r.shape[0]:
            out[i, : r.shape[0]] = r
    return out


def stack_states(states: list[State], history_fields: frozenset[str]) -> tuple[State, torch.Tensor]:
    """Per-user states -> one batched state and the ``[U]`` history lengths.

    History fields are right-padded to the longest history of the batch (``mask`` is added: ``[U, T_max]``
    bool); other fields are stacked.
    """
    lengths = torch.stack([s["length"] for s in states])
    max_len = int(lengths.max().item()) if len(states) else 0
    out: State = {"length": lengths, "mask": history_mask(lengths, max_len)}
    for key in states[0]:
        if key == "length":
            continue
        rows = [s[key] for s in states]
        out[key] = pad_rows(rows, max_len) if key in history_fields else torch.stack(rows)
    return out, lengths


def index_gather(owner: torch.Tensor, num_users: int) -> Gather:
    """Per-user ``[U, ...]`` -> per-candidate ``[M, ...]`` rows; a broadcast view when there is one user."""
    m = owner.numel()
    if num_users == 1:
        return lambda x: x.expand(m, *x.shape[1:])
    return lambda x: x.index_select(0, owner)


def repeat_gather(per_user: int) -> Gather:
    """``[U, ...]`` -> ``[U * per_user, ...]`` (each user's row repeated for its ``per_user`` candidates),
    with static shapes (for :mod:`torch.export`)."""

    def gather(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1).expand(x.shape[0], per_user, *x.shape[1:]).flatten(0, 1)

    return gather


# --------------------------------------------------------------------------------------------------------
# Padded (export-friendly) building blocks
# --------------------------------------------------------------------------------------------------------


def sessionize_padded(
    values: torch.Tensor,
    timestamps: torch.Tensor,
    mask: torch.Tensor,
    gap_seconds: int,
    max_sessions: int,
    max_session_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~din_torchrec.modules.sessions.sessionize` on a right-padded block, static shapes only.

    Args:
        values: ``[U, T, D]``, real behaviours first (oldest first), then padding.
        timestamps: ``[U, T]`` int64.
        mask: ``[U, T]`` bool, a prefix of each row.

    Returns:
        ``(sessions [U, K, L, D], behaviour_mask [U, K, L], session_mask [U, K])`` as ``sessionize``.
    """
    u, t, d = values.shape
    k_max, l_max = max_sessions, max_session_len
    # A session opens at a user's first behaviour and after every gap strictly above the threshold.
    gaps = (timestamps[:, 1:] - timestamps[:, :-1]) > gap_seconds
    starts = torch.cat([mask[:, :1], gaps & mask[:, 1:]], 1)
    local_id = torch.cumsum(starts.long(), 1) - 1  # session index within the user, -1 before the first
    n_sessions = starts.long().sum(1, keepdim=True)
    slot = local_id - (n_sessions - k_max).clamp_min(0)
    idx = torch.arange(t, device=values.device).unsqueeze(0).expand(u, t)
    session_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 1).values
    # Session lengths, counted into a [U, T] buffer (a user has at most T sessions).
    safe_id = local_id.clamp_min(0)
    session_len = torch.zeros(u, t, dtype=torch.long, device=values.device).scatter_add(
        1, safe_id, mask.long()
    )
    pos = idx - session_start - (session_len.gather(1, safe_id) - l_max).clamp_min(0)
    keep = mask & (slot >= 0) & (pos >= 0)
    dump = u * k_max * l_max
    user = torch.arange(u, device=values.device).unsqueeze(1)
    flat = torch.where(keep, (user * k_max + slot) * l_max + pos, torch.full_like(idx, dump)).reshape(-1)
    sessions = values.new_zeros(dump + 1, d).index_add(0, flat, values.reshape(u * t, d))[:dump]
    behaviour_mask = torch.zeros(dump + 1, dtype=torch.bool, device=values.device).index_fill(0, flat, True)
    behaviour_mask = behaviour_mask[:dump].view(u, k_max, l_max)
    session_mask = torch.arange(k_max, device=values.device).unsqueeze(0) < n_sessions.clamp_max(k_max)
    return sessions.view(u, k_max, l_max, d), behaviour_mask, session_mask


def _unidirectional_copy(lstm: nn.LSTM, suffix: str) -> nn.LSTM:
    """One direction of a one-layer bidirectional ``nn.LSTM`` as its own unidirectional LSTM."""
    one = nn.LSTM(lstm.input_size, lstm.hidden_size, batch_first=True)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(one, f"{name}_l0").copy_(getattr(lstm, f"{name}_l0{suffix}"))
    return one


def reverse_prefix_index(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``[U, size]`` index reversing each row's first ``lengths[u]`` slots and keeping the rest (an
    involution: gathering twice restores the order)."""
    k = torch.arange(size, device=lengths.device).unsqueeze(0)
    n = lengths.unsqueeze(1)
    return torch.where(k < n, n - 1 - k, k)


# --------------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------------


class Scorer(nn.Module):
    """The split forward of one model (see the module docstring). Holds the model's dense modules (shared,
    not copied) and none of its embedding tables.

    Attributes:
        history_fields: state fields with one row per history position.
        attention_names: names of the attention maps :meth:`candidate_side` returns.
    """

    history_fields: frozenset[str] = frozenset()
    attention_names: tuple[str, ...] = ()

    def __init__(self, model: SequenceCTRModel) -> None:
        super().__init__()
        self.top = model.top
        self.has_profile = model.profile_embeddings is not None

    def user_side_jagged(
        self, behaviours: torch.Tensor, lengths: torch.Tensor, timestamps: torch.Tensor
    ) -> State:
        """Batched state of U users from jagged histories (``behaviours [N, S]``, ``lengths [U]``,
        ``timestamps [N]``), computed with the model's modules. History fields come back jagged
        (``[N, ...]``); :func:`split_state` cuts them per user."""
        raise NotImplementedError

    def user_side_padded(
        self, behaviours: torch.Tensor, mask: torch.Tensor, timestamps: torch.Tensor
    ) -> State:
        """Batched state (history fields ``[U, T, ...]``) from a right-padded block, static shapes only."""
        raise NotImplementedError

    def candidate_side(
        self, state: State, gather: Gather, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(interest [M, W], attention maps)`` for ``candidates [M, S]``; ``gather`` maps a per-user tensor
        ``[U, ...]`` to the candidates' rows ``[M, ...]``."""
        raise NotImplementedError

    def logits(
        self, profile: torch.Tensor | None, state: State, gather: Gather, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits [M], attention maps)``: the top MLP on ``[profile, candidate, interest]``."""
        interest, attention = self.candidate_side(state, gather, candidates)
        parts = [candidates, interest]
        if profile is not None:
            parts.insert(0, gather(profile))
        return mlp_eval(self.top, torch.cat(parts, dim=-1)).squeeze(-1), attention


def split_state(state: State, lengths: torch.Tensor, history_fields: frozenset[str]) -> list[State]:
    """A batched state from :meth:`Scorer.user_side_jagged` -> one state per user (tensors cloned, so a
    cached state does not pin the whole batch)."""
    sizes = lengths.tolist()
    out: list[State] = [{"length": lengths[i].clone()} for i in range(len(sizes))]
    for key, value in state.items():
        parts = value.split(sizes) if key in history_fields else value.unbind(0)
        for i, p in enumerate(parts):
            out[i][key] = p.clone()
    return out


class BaseScorer(Scorer):
    """The sum-pooling base model: the pooled history is the whole user side."""

    def user_side_jagged(self, behaviours, lengths, timestamps):
        seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        pooled = behaviours.new_zeros(lengths.numel(), behaviours.shape[-1]).index_add(0, seg, behaviours)
        return {"pooled": pooled}

    def user_side_padded(self, behaviours, mask, timestamps):
        return {"pooled": (behaviours * mask.unsqueeze(-1)).sum(1)}

    def candidate_side(self, state, gather, candidates):
        return gather(state["pooled"]), {}


class DINScorer(Scorer):
    """DIN: the behaviours and their projection ``(W_b + W_d) b`` per user; attention per candidate."""

    history_fields = frozenset({"behaviours", "projection"})
    attention_names = ("history",)

    def __init__(self, model: DIN) -> None:
        super().__init__(model)
        self.attention = model.attention

    def user_side_jagged(self, behaviours, lengths, timestamps):
        return {"behaviours": behaviours, "projection": unit_key_projection(self.attention.unit, behaviours)}

    def user_side_padded(self, behaviours, mask, timestamps):
        return self.user_side_jagged(behaviours, mask.sum(1), timestamps)

    def candidate_side(self, state, gather, candidates):
        b = gather(state["behaviours"])
        mask = gather(state["mask"])
        scores = unit_scores(self.attention.unit, b, gather(state["projection"]), candidates)
        if self.attention.normalization == "softmax":
            weights = masked_softmax(scores, mask)
        else:
            weights = scores * mask
        pooled = (weights.unsqueeze(1) @ b).squeeze(1)
        return pooled, {"history": weights}


class DIENScorer(Scorer):
    """DIEN: extractor states, the cell's input projection and the unit's key projection per user; the
    attention and the attentional GRU per candidate."""

    history_fields = frozenset({"states", "input_projection", "projection"})
    attention_names = ("evolution",)
    #: Run the recurrence as ``torch``'s ``scan`` (set for export: a compact graph instead of T copies).
    use_scan = False

    def __init__(self, model: DIEN) -> None:
        super().__init__(model)
        self.extractor = model.extractor
        self.evolution = model.evolution

    def _from_states(self, states: torch.Tensor) -> State:
        return {
            "states": states,
            "input_projection": self.evolution.cell.project_input(states),
            "projection": unit_key_projection(self.evolution.unit, states),
        }

    def user_side_jagged(self, behaviours, lengths, timestamps):
        states, _ = self.extractor(behaviours, lengths)
        return self._from_states(states)

    def user_side_padded(self, behaviours, mask, timestamps):
        # The GRU is causal: on right-padded input the outputs at real positions are the packed ones.
        out, _ = self.extractor.gru(behaviours.transpose(0, 1))
        return self._from_states(out.transpose(0, 1))

    def candidate_side(self, state, gather, candidates):
        evo = self.evolution
        states = gather(state["states"])
        mask = gather(state["mask"])
        query = evo.candidate_projection(candidates)
        scores = unit_scores(evo.unit, states, gather(state["projection"]), query)
        att = masked_softmax(scores, mask)
        x_proj = gather(state["input_projection"])
        h = states.new_zeros(candidates.shape[0], evo.hidden_size)
        if self.use_scan:
            return self._recurrence_scan(h, x_proj, att, mask), {"evolution": att}
        for t in range(states.shape[1]):
            h_next = evo.cell.step(x_proj[:, t], h, att[:, t])
            h = torch.where(mask[:, t : t + 1], h_next, h)
        return h, {"evolution": att}

    def _recurrence_scan(
        self, h: torch.Tensor, x_proj: torch.Tensor, att: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The masked recurrence as one ``scan`` (exported as a loop, not unrolled T times)."""
        from torch._higher_order_ops.scan import scan

        cell = self.evolution.cell

        def step(h: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            x_t, a_t, m_t = inputs
            h = torch.where(m_t.unsqueeze(1), cell.step(x_t, h, a_t), h)
            return h, h.clone()

        final, _ = scan(step, h, (x_proj.transpose(0, 1), att.transpose(0, 1), mask.transpose(0, 1)))
        return final


class DSINScorer(Scorer):
    """DSIN: session interests and Bi-LSTM states (and the units' key projections) per user; the two
    target attentions over sessions per candidate."""

    attention_names = ("sessions", "session_states")

    def __init__(self, model: DSIN) -> None:
        super().__init__(model)
        self.interaction = model.interaction
        lstm = model.interaction.interactor.lstm
        # For the padded (export) path: the Bi-LSTM's two directions as unidirectional LSTMs (copies).
        self.lstm_forward = _unidirectional_copy(lstm, "")
        self.lstm_backward = _unidirectional_copy(lstm, "_reverse")

    def _with_projections(
        self, interests: torch.Tensor, states: torch.Tensor, session_mask: torch.Tensor
    ) -> State:
        out = {"interests": interests, "lstm_states": states, "session_mask": session_mask}
        for name, att, keys in (
            ("interest_projection", self.interaction.interest_attention, interests),
            ("state_projection", self.interaction.state_attention, states),
        ):
            if att.unit is not None:
                out[name] = unit_key_projection(att.unit, keys)
        return out

    def user_side_jagged(self, behaviours, lengths, timestamps):
        it = self.interaction
        sessions, behaviour_mask, session_mask = sessionize(
            behaviours, timestamps, lengths, it.gap_seconds, it.max_sessions, it.max_session_len
        )
        interests = it.extractor(it.bias_encoding(sessions), behaviour_mask)
        states = it.interactor(interests, session_mask)
        return self._with_projections(interests, states, session_mask)

    def user_side_padded(self, behaviours, mask, timestamps):
        it = self.interaction
        sessions, behaviour_mask, session_mask = sessionize_padded(
            behaviours, timestamps, mask, it.gap_seconds, it.max_sessions, it.max_session_len
        )
        u, k, l_max, d = sessions.shape
        # Every session slot goes through the transformer layer (empty ones too: no data-dependent shapes);
        # sessions do not interact, and empty ones pool to zeros.
        x = it.bias_encoding(sessions).reshape(u * k, l_max, d)
        m = behaviour_mask.reshape(u * k, l_max)
        h = it.extractor.encode(x, m)
        mf = m.unsqueeze(-1).to(h.dtype)
        interests = ((h * mf).sum(1) / mf.sum(1).clamp_min(1.0)).view(u, k, d)
        # Bi-LSTM over the real prefix of sessions: forward over the sessions, backward over the prefix
        # reversed in place (padding stays behind it, so neither direction sees it before a real slot).
        counts = session_mask.long().sum(1)
        rev = reverse_prefix_index(counts, k).unsqueeze(-1)
        out_f = self.lstm_forward(interests)[0]
        out_b = self.lstm_backward(interests.gather(1, rev.expand(u, k, d)))[0]
        out_b = out_b.gather(1, rev.expand(u, k, out_b.shape[-1]))
        states = torch.cat([out_f, out_b], dim=-1) * session_mask.unsqueeze(-1)
        return self._with_projections(interests, states, session_mask)

    def _attend(self, att, keys, key_projection, mask, query):
        if att.bilinear is not None:
            scores = (keys @ att.bilinear(query).unsqueeze(-1)).squeeze(-1)
        else:
            scores = unit_scores(att.unit, keys, key_projection, att.project(query))
        weights = masked_softmax(scores, mask)
        return (weights.unsqueeze(1) @ keys).squeeze(1), weights

    def candidate_side(self, state, gather, candidates):
        it = self.interaction
        mask = gather(state["session_mask"])
        proj_i = gather(state["interest_projection"]) if "interest_projection" in state else None
        proj_h = gather(state["state_projection"]) if "state_projection" in state else None
        u_i, a_i = self._attend(it.interest_attention, gather(state["interests"]), proj_i, mask, candidates)
        u_h, a_h = self._attend(it.state_attention, gather(state["lstm_states"]), proj_h, mask, candidates)
        return torch.cat([u_i, u_h], dim=-1), {"sessions": a_i, "session_states": a_h}


def make_scorer(model: SequenceCTRModel) -> Scorer:
    """The scorer of ``model`` (base, DIN, DIEN or DSIN)."""
    for cls, scorer in ((DIN, DINScorer), (DIEN, DIENScorer), (DSIN, DSINScorer), (BaseModel, BaseScorer)):
        if isinstance(model, cls):
            return scorer(model)
    raise TypeError(f"no serving scorer for {type(model).__name__}")
