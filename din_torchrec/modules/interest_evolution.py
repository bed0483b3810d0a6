"""DIEN's interest extractor, interest evolution (AUGRU / AGRU / AIGRU) and auxiliary next-behaviour loss.

Everything takes the batch's behaviour sequence *jagged*, as the models receive it: ``[N, D]`` rows sample
after sample (oldest first) and ``lengths [B]`` (0 allowed), N = lengths.sum(). No padded ``[B, T, D]``
block is built and no compute is spent on padding:

* recurrences run on a *packed* layout (the one of :class:`torch.nn.utils.rnn.PackedSequence`): time-major,
  the samples sorted by length descending, so at step t only the first ``batch_sizes[t]`` samples are active
  and a step's work covers exactly those (see :func:`packed_layout`);
* the input-side products of a recurrence (``W x`` for every step) are one ``[N, I] @ [I, 3H]`` matmul before
  the loop; each step then only multiplies the hidden state, over its active samples (one Python loop over T
  steps, never over samples);
* the auxiliary loss scores only the real ``(t, t + 1)`` pairs of each sample, so padded steps can neither
  add terms nor dilute the mean (libraries that average a masked loss over every padded position get a loss
  scaled by the batch's fill ratio).

Each fast path has a ``*_reference`` twin that loops over samples and steps literally; the tests check them
against each other, forward and backward.

Gate layout of the cells (rows of ``weight_ih [G * H, I]``, ``weight_hh [G * H, H]``, ``bias [G * H]``):
``[u, r, h~]`` for :class:`AUGRUCell` and :class:`AIGRUCell` (G = 3), ``[r, h~]`` for :class:`AGRUCell`
(G = 2: attention replaces the update gate, so it has no update-gate weights; unused parameters would break
DDP's gradient reduction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from din_torchrec.modules.attention import LocalActivationUnit, complete_offsets, segment_ids, segment_softmax
from din_torchrec.modules.mlp import MLP, linear_rows, row_bucketed
from din_torchrec.modules.recurrence import packed_recurrence, projected_recurrence
from din_torchrec.modules.rows import gather_rows, inverse_index
from din_torchrec.ops.linear import linear, native_linear_dtype
from din_torchrec.ops.pair_loss import sigmoid_mlp_pair_loss

EVOLUTION_KINDS = ("augru", "agru", "aigru")


# --------------------------------------------------------------------------------------------------------------
# Packed layout of a jagged batch
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PackedLayout:
    """Where every jagged row goes in the time-major packed layout (that of ``PackedSequence``).

    Samples are ranked by length descending (stable); packed row ``cum[t] + r`` holds step t of the sample of
    rank r, for the ``batch_sizes[t]`` samples with length > t (ranks ``0 .. batch_sizes[t] - 1``).

    Attributes:
        batch_sizes: ``[T]`` int64 on CPU, active samples per step (T = the longest length).
        steps: ``batch_sizes`` as Python ints, for the step loop.
        order: ``[B]`` sample index of each rank (samples sorted by length descending).
        inverse_order: ``[B]`` rank of each sample.
        packed_index: ``[N]`` the jagged row of each packed row (gather jagged -> packed).
        unpack_index: ``[N]`` the packed row of each jagged row (gather packed -> jagged).
        last_rows: ``[num_active]`` the packed row of the last step of each rank with a step.
        segments: ``[N]`` the sample of each jagged row (:func:`segment_ids`), for the layers that also need it.
    """

    batch_sizes: torch.Tensor
    steps: list[int]
    order: torch.Tensor
    inverse_order: torch.Tensor
    packed_index: torch.Tensor
    unpack_index: torch.Tensor
    last_rows: torch.Tensor
    segments: torch.Tensor

    @property
    def num_active(self) -> int:
        """Samples with at least one behaviour."""
        return self.steps[0] if self.steps else 0


def packed_layout(lengths: torch.Tensor) -> PackedLayout:
    """Build the :class:`PackedLayout` of ``lengths [B]`` in O(N + B + T) (no ``[T, B]`` mask).

    Two host syncs (the longest length and the batch sizes), which any packed recurrence needs.
    """
    lengths = lengths.long()
    device = lengths.device
    b = lengths.numel()
    order = torch.argsort(lengths, descending=True, stable=True)
    inverse_order = torch.empty_like(order)
    inverse_order[order] = torch.arange(b, device=device)
    max_len = int(lengths.max().item()) if b else 0
    # batch_sizes[t] = #{samples with length > t} = B - #{length <= t}.
    counts = torch.bincount(lengths, minlength=max_len + 1)
    batch_sizes = b - torch.cumsum(counts, 0)[:max_len]
    step_starts = torch.cumsum(batch_sizes, 0) - batch_sizes  # first packed row of each step
    segments = segment_ids(lengths)
    n = segments.numel()
    position = torch.arange(n, device=device) - complete_offsets(lengths)[:-1].index_select(0, segments)
    unpack_index = step_starts.index_select(0, position) + inverse_order.index_select(0, segments)
    packed_index = torch.empty_like(unpack_index)
    packed_index[unpack_index] = torch.arange(n, device=device)
    batch_sizes_cpu = batch_sizes.cpu()
    steps = batch_sizes_cpu.tolist()
    active = steps[0] if steps else 0
    # Rank r (length L_r > 0) ends at step L_r - 1, in packed row step_starts[L_r - 1] + r.
    last_rows = step_starts.index_select(0, lengths.index_select(0, order[:active]) - 1) + torch.arange(
        active, device=device
    )
    return PackedLayout(
        batch_sizes=batch_sizes_cpu,
        steps=steps,
        order=order,
        inverse_order=inverse_order,
        packed_index=packed_index,
        unpack_index=unpack_index,
        last_rows=last_rows,
        segments=segments,
    )


# --------------------------------------------------------------------------------------------------------------
# Attentional GRU cells
# --------------------------------------------------------------------------------------------------------------


class _AttentionalGRUCell(nn.Module):
    """Shared parameters and the split ``forward = step(project_input(x))``.

    ``project_input`` is the bias-free input product ``W x``; it is separated so that a recurrence can compute
    it for all N steps in one matmul and call :meth:`step` per time step.
    """

    num_gates = 3

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        g = self.num_gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(g, input_size))
        self.weight_hh = nn.Parameter(torch.empty(g, hidden_size))
        self.bias = nn.Parameter(torch.empty(g))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # torch.nn.GRUCell's initialisation.
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def project_input(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, I] -> [M, G * H]``, ``W x`` without bias."""
        return linear(x, self.weight_ih)  # x @ W^T (float32 / bf16 autocast on the CPU: the BRGEMM kernel)

    def step(self, x_proj: torch.Tensor, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """One step from a projected input.

        Args:
            x_proj: ``[B, G * H]`` from :meth:`project_input`.
            h: ``[B, H]`` previous state.
            att: ``[B]`` attention score of this step.

        Returns:
            ``[B, H]`` next state.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """``(x [B, I], h [B, H], att [B]) -> h' [B, H]``."""
        return self.step(self.project_input(x), h, att)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


def _gru_update(
    x: torch.Tensor, hh: torch.Tensor, h: torch.Tensor, hidden: int, u_scale: torch.Tensor | None
):
    """GRU with ``[u, r, h~]`` pre-activations ``x`` (input side, biased) and ``hh`` (``U h``);
    ``u_scale [B, 1]`` multiplies the update gate (AUGRU) when given."""
    ur = torch.sigmoid(x[:, : 2 * hidden] + hh[:, : 2 * hidden])
    u, r = ur.chunk(2, dim=1)
    cand = torch.tanh(x[:, 2 * hidden :] + r * hh[:, 2 * hidden :])
    if u_scale is not None:
        u = u * u_scale
    # (1 - u) h + u h~ = h + u (h~ - h)
    return torch.addcmul(h, u, cand - h)


class AUGRUCell(_AttentionalGRUCell):
    """GRU with attentional update gate (DIEN):

    ``u = σ(W_u x + U_u h + b_u)``, ``r = σ(W_r x + U_r h + b_r)``, ``h~ = tanh(W_h x + r ∘ (U_h h) + b_h)``,
    ``u' = a u``, ``h' = (1 - u') ∘ h + u' ∘ h~``.

    Shapes: ``(x [B, I], h [B, H], att [B]) -> [B, H]``.
    """

    def step(self, x_proj: torch.Tensor, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        return _gru_update(x_proj + self.bias, h @ self.weight_hh.t(), h, self.hidden_size, att.unsqueeze(1))


class AGRUCell(_AttentionalGRUCell):
    """Attention-based GRU (DIEN): the attention score replaces the update gate,

    ``r = σ(W_r x + U_r h + b_r)``, ``h~ = tanh(W_h x + r ∘ (U_h h) + b_h)``, ``h' = (1 - a) h + a h~``.

    Gate rows ``[r, h~]`` (no update gate). Shapes: ``(x [B, I], h [B, H], att [B]) -> [B, H]``.
    """

    num_gates = 2

    def step(self, x_proj: torch.Tensor, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden_size
        x = x_proj + self.bias
        hh = h @ self.weight_hh.t()
        r = torch.sigmoid(x[:, :hidden] + hh[:, :hidden])
        cand = torch.tanh(x[:, hidden:] + r * hh[:, hidden:])
        return torch.addcmul(h, att.unsqueeze(1), cand - h)


class AIGRUCell(_AttentionalGRUCell):
    """GRU with attentional input (DIEN's AIGRU): a plain GRU (same equations as :class:`AUGRUCell` without
    the ``a`` factor) on the input scaled by attention, ``i' = a x``.

    Shapes: ``(x [B, I], h [B, H], att [B]) -> [B, H]``.
    """

    def step(self, x_proj: torch.Tensor, h: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        # W (a x) = a (W x): scaling the projection is scaling the input, and keeps the projection hoistable.
        x = torch.addcmul(self.bias, x_proj, att.unsqueeze(1))
        return _gru_update(x, h @ self.weight_hh.t(), h, self.hidden_size, None)


_CELLS: dict[str, type[_AttentionalGRUCell]] = {"augru": AUGRUCell, "agru": AGRUCell, "aigru": AIGRUCell}


def make_evolution_cell(kind: str, input_size: int, hidden_size: int) -> _AttentionalGRUCell:
    """The cell of ``kind`` (``augru``, ``agru`` or ``aigru``)."""
    if kind not in _CELLS:
        raise ValueError(f"interest evolution kind: expected one of {EVOLUTION_KINDS}, got {kind!r}")
    return _CELLS[kind](input_size, hidden_size)


# --------------------------------------------------------------------------------------------------------------
# Interest extractor
# --------------------------------------------------------------------------------------------------------------


class InterestExtractor(nn.Module):
    """DIEN's interest extractor layer: a GRU over each sample's behaviours, ``h_t = GRU(e_t, h_{t-1})``.

    The parameters are those of a one-layer :class:`torch.nn.GRU` (``self.gru``). The jagged rows are gathered
    into the packed layout (no padded block, no padded steps); on the CPU the GRU then runs as
    :func:`~din_torchrec.modules.recurrence.packed_recurrence` (one autograd node, hand-written
    backpropagation through time: 2.3x ``nn.GRU`` on a padded block at history 200, see docs/benchmarks.md),
    on CUDA as ``nn.GRU`` on a ``PackedSequence`` (cuDNN), which :meth:`forward_packed` also is on the CPU (the
    reference the tests compare with).

    Args:
        input_size: D, the behaviour width.
        hidden_size: H.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.gru = nn.GRU(input_size, hidden_size, batch_first=False)

    def forward(
        self, behaviours: torch.Tensor, lengths: torch.Tensor, layout: PackedLayout | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Jagged GRU.

        Args:
            behaviours: ``[N, D]`` jagged, sample after sample, oldest first.
            lengths: ``[B]`` (0 allowed).
            layout: :func:`packed_layout` of ``lengths``, to share it with :class:`InterestEvolution`.

        Returns:
            ``(states [N, H], final [B, H])``: ``states`` aligned with ``behaviours`` (row j is the state after
            behaviour j), ``final`` the state after each sample's last behaviour (zeros for an empty history).
        """
        states, final, _ = self.forward_with_packed(behaviours, lengths, layout)
        return states, final

    def forward_with_packed(
        self, behaviours: torch.Tensor, lengths: torch.Tensor, layout: PackedLayout | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`forward`'s ``(states, final)`` and the states in the layout's packed order as the recurrence
        wrote them (``None`` where it did not run: an empty batch, cuDNN's path), for
        :meth:`InterestEvolution.forward`'s ``packed_states``."""
        if layout is None:
            layout = packed_layout(lengths)
        b = lengths.numel()
        if layout.num_active == 0:
            empty = behaviours.new_zeros(0, self.hidden_size)
            return empty, behaviours.new_zeros(b, self.hidden_size), None
        if behaviours.is_cuda:
            # cuDNN runs the whole packed GRU in its own kernels: 2.7x this recurrence's speed on an H200
            # (docs/benchmarks.md, GPU check), where the recurrence's per-step launches dominate.
            return (*self.forward_packed(behaviours, lengths, layout), None)
        gru = self.gru
        # The input side of the steps in packed (time-major, length-ranked) order: projected inside the native
        # kernel, else one matmul over all rows first (project_packed).
        packed = projected_recurrence(
            behaviours,
            layout.packed_index,
            gru.weight_ih_l0,
            gru.bias_ih_l0,
            None,
            gru.weight_hh_l0,
            gru.bias_hh_l0,
            layout.steps,
            "gru",
            project=lambda: project_packed(behaviours, layout, gru.weight_ih_l0),
        )
        states = gather_rows(packed, layout.unpack_index, layout.packed_index)
        return states, final_states(packed, layout, lengths), packed

    def forward_packed(
        self, behaviours: torch.Tensor, lengths: torch.Tensor, layout: PackedLayout | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference: the same through ``torch.nn.GRU`` on a ``PackedSequence`` (autograd records every step).
        Same arguments and returns as :meth:`forward`."""
        if layout is None:
            layout = packed_layout(lengths)
        b = lengths.numel()
        active = layout.num_active
        if active == 0:
            return behaviours.new_zeros(0, self.hidden_size), behaviours.new_zeros(b, self.hidden_size)
        # Samples are already sorted (no sorted_indices): nn.GRU then starts from zeros for the `active`
        # non-empty samples only; empty ones sort last and get zeros below.
        packed = PackedSequence(behaviours.index_select(0, layout.packed_index), layout.batch_sizes)
        out, h_n = self.gru(packed)
        states = out.data.index_select(0, layout.unpack_index)
        final_sorted = h_n[0]
        if active < b:
            final_sorted = torch.cat([final_sorted, final_sorted.new_zeros(b - active, self.hidden_size)])
        return states, final_sorted.index_select(0, layout.inverse_order)


def project_packed(
    x: torch.Tensor, layout: PackedLayout, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [N, I]`` (jagged order) -> ``[N, O]``, ``W x + b`` of its rows in the layout's packed order: the
    input side of every recurrence step in one matmul. Under bf16 on the CPU the linear kernel reads the rows
    by index and rounds them itself (no gathered copy, no cast of all rows; its backward scatters the rows'
    gradient back); elsewhere :func:`~din_torchrec.modules.rows.gather_rows` then :func:`linear_rows`."""
    if native_linear_dtype(x, weight) == torch.bfloat16:
        return linear(x, weight, bias, rows=layout.packed_index)
    return linear_rows(gather_rows(x, layout.packed_index, layout.unpack_index), weight, bias)


def final_states(packed: torch.Tensor, layout: PackedLayout, lengths: torch.Tensor) -> torch.Tensor:
    """``[N, H]`` packed states -> ``[B, H]`` the state after each sample's last step (zeros if empty)."""
    if packed.shape[0] == 0:
        return packed.new_zeros(lengths.numel(), packed.shape[1])
    return unrank_final(packed.index_select(0, layout.last_rows), layout)


def unrank_final(ranked: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
    """``[B0, H]`` last states by rank (``packed[layout.last_rows]``) -> ``[B, H]`` by sample, zeros for the
    samples without a step."""
    b, active = layout.order.numel(), layout.num_active
    if active < b:
        ranked = torch.cat([ranked, ranked.new_zeros(b - active, ranked.shape[1])])
    return gather_rows(ranked, layout.inverse_order, layout.order)  # a permutation: backward gathers too


# --------------------------------------------------------------------------------------------------------------
# Interest evolution
# --------------------------------------------------------------------------------------------------------------


class InterestEvolution(nn.Module):
    """DIEN's interest evolution layer: attention of each interest state on the candidate, then an attentional
    GRU over the states; the user interest is the evolved state after the last real step.

    ``a_t = softmax_t(LAU(h_t, W_c c))`` over the real steps of a sample (DIN's local activation unit on
    ``[h, c, h - c, h * c]``; ``W_c`` projects the candidate to the state width when they differ), then
    ``h'_t = cell(h_t, h'_{t-1}, a_t)`` from ``h'_{-1} = 0``.

    Args:
        input_size: H_in, the width of the extractor states.
        hidden_size: H, the evolved state width.
        candidate_dim: D_c, the candidate width.
        kind: ``augru`` (DIEN's choice), ``agru`` or ``aigru``.
        attention_hidden: hidden widths of the local activation unit's MLP.
        attention_activation: its activation (``dice``, ``prelu``, ...).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        candidate_dim: int,
        kind: str = "augru",
        attention_hidden: Sequence[int] = (80, 40),
        attention_activation: str = "dice",
        dice_eps: float = 1e-8,
        dice_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.cell = make_evolution_cell(kind, input_size, hidden_size)
        # The unit compares h with c elementwise, so both need the state width.
        self.candidate_projection: nn.Module = (
            nn.Identity() if candidate_dim == input_size else nn.Linear(candidate_dim, input_size)
        )
        self.unit = LocalActivationUnit(
            input_size, list(attention_hidden), attention_activation, dice_eps, dice_momentum
        )

    def attention(
        self,
        states: torch.Tensor,
        lengths: torch.Tensor,
        candidates: torch.Tensor,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Jagged attention ``[N]``: softmax over each sample's real steps of the unit's scores.

        Args:
            states: ``[N, H_in]`` jagged.
            lengths: ``[B]``.
            candidates: ``[B, D_c]``.
            segments: :func:`segment_ids` of ``lengths`` if already built.
        """
        if segments is None:
            segments = segment_ids(lengths)
        scores = self.unit.scores_jagged(states, self.candidate_projection(candidates), segments)
        return segment_softmax(scores, segments, lengths.numel())

    def forward(
        self,
        states: torch.Tensor,
        lengths: torch.Tensor,
        candidates: torch.Tensor,
        layout: PackedLayout | None = None,
        packed_states: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed fast path.

        Args:
            states: ``[N, H_in]`` jagged interest states (:class:`InterestExtractor` output).
            lengths: ``[B]`` (0 allowed).
            candidates: ``[B, D_c]``.
            layout: :func:`packed_layout` of ``lengths``, if already built.
            packed_states: the same states in ``layout``'s packed order, if the caller has them
                (:meth:`InterestExtractor.forward_with_packed`): the recurrence's input then needs no gather.

        Returns:
            ``(final [B, H], attention [N])``: the evolved state after each sample's last step (zeros for an
            empty history) and the attention of every step.
        """
        if layout is None:
            layout = packed_layout(lengths)
        b = lengths.numel()
        att = self.attention(states, lengths, candidates, layout.segments)
        if not layout.steps:
            return states.new_zeros(b, self.hidden_size), att
        cell = self.cell

        def project() -> torch.Tensor:
            # cell.project_input on every step's input in one matmul, in packed (time-major, length-ranked)
            # order; its rows padded to a bucket where the matmul is oneDNN's (linear_rows).
            if packed_states is None:
                return project_packed(states, layout, cell.weight_ih)
            return linear_rows(packed_states, cell.weight_ih)

        a = gather_rows(att, layout.packed_index, layout.unpack_index)
        if self.kind == "aigru":
            # W (a x) = a (W x): the attention scales the projection; then a plain GRU.
            packed = packed_recurrence(
                torch.addcmul(cell.bias, project(), a.unsqueeze(1)),
                None,
                cell.weight_hh,
                None,
                layout.steps,
                "ugru",
            )
        else:
            # The input projection inside the native kernel where it runs; the bias is added inside the
            # recurrence either way (under bf16 autocast `x + bias` was a mixed-dtype pass writing a float32 copy
            # of all N x 3H values, and its backward another pass).
            x_in, rows = (states, layout.packed_index) if packed_states is None else (packed_states, None)
            packed = projected_recurrence(
                x_in,
                rows,
                cell.weight_ih,
                cell.bias,
                a,
                cell.weight_hh,
                None,
                layout.steps,
                self.kind,
                project,
                layout.last_rows,
            )
            return unrank_final(packed, layout), att
        return final_states(packed, layout, lengths), att

    def forward_loop(
        self,
        states: torch.Tensor,
        lengths: torch.Tensor,
        candidates: torch.Tensor,
        layout: PackedLayout | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference: the packed loop of :meth:`forward` with the cell's ``step`` under autograd (one graph node
        per op and step). Same arguments and returns as :meth:`forward`."""
        if layout is None:
            layout = packed_layout(lengths)
        b = lengths.numel()
        att = self.attention(states, lengths, candidates)
        if not layout.steps:
            return states.new_zeros(b, self.hidden_size), att
        x_steps = self.cell.project_input(states).index_select(0, layout.packed_index).split(layout.steps)
        a_steps = att.index_select(0, layout.packed_index).split(layout.steps)
        h = states.new_zeros(b, self.hidden_size)  # rank order; empty histories are the last ranks
        finished: list[torch.Tensor] = []  # states of samples whose history has ended, longest ranks last
        for x_t, a_t, active in zip(x_steps, a_steps, layout.steps):
            if active < h.shape[0]:
                # split, not slicing: a slice's backward writes a zero-filled copy of the whole tensor.
                h, done = h.split([active, h.shape[0] - active])
                finished.append(done)
            h = self.cell.step(x_t, h, a_t)
        finished.append(h)
        final_ranked = torch.cat(finished[::-1])
        return final_ranked.index_select(0, layout.inverse_order), att

    def forward_reference(
        self, states: torch.Tensor, lengths: torch.Tensor, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Literal reference: per sample, per step, with the cell's ``forward``; same args and returns as
        :meth:`forward`.

        The unit scores all N rows in one call, like the fast path, because a Dice activation normalises by
        the statistics of the rows it sees; the softmax and the recurrence then loop per sample.
        """
        cand = self.candidate_projection(candidates)
        seg = segment_ids(lengths)
        scores = self.unit.scores_reference(states, cand.index_select(0, seg))
        finals, atts, start = [], [], 0
        for n in lengths.tolist():
            a = torch.softmax(scores[start : start + n], dim=0)
            h = states.new_zeros(1, self.hidden_size)
            for t in range(n):
                h = self.cell(states[start + t : start + t + 1], h, a[t : t + 1])
            finals.append(h[0])
            atts.append(a)
            start += n
        final = torch.stack(finals) if finals else states.new_zeros(0, self.hidden_size)
        return final, torch.cat(atts) if atts else scores


# --------------------------------------------------------------------------------------------------------------
# Auxiliary loss
# --------------------------------------------------------------------------------------------------------------


class AuxiliaryNextBehaviourLoss(nn.Module):
    """DIEN's auxiliary loss: each interest state h_t must tell the real next behaviour e_{t+1} from a negative
    one for step t + 1,

    ``L = mean over real pairs (t, t+1) of  BCE(s(h_t, e_{t+1}), 1) + BCE(s(h_t, e^-_{t+1}), 0)``,

    over t = 0 .. L - 2 of every sample (samples with fewer than 2 behaviours contribute nothing). The mean is
    over the real pairs of the batch only; 0 (with a graph) when there is none.

    Args:
        state_dim: H, the interest state width.
        behaviour_dim: D, the behaviour width.
        scorer: ``mlp`` (the DIEN paper: an MLP on ``[h, e]`` ending in one logit) or ``dot`` (``h · e``,
            needs H == D).
        hidden: hidden widths of the ``mlp`` scorer.
        activation: its activation (the paper's auxiliary net uses sigmoid). With a batch-statistics activation
            (Dice) the statistics are those of all scored rows (positives and negatives of the batch).
    """

    def __init__(
        self,
        state_dim: int,
        behaviour_dim: int,
        scorer: str = "mlp",
        hidden: Sequence[int] = (100, 50),
        activation: str = "sigmoid",
    ) -> None:
        super().__init__()
        if scorer not in ("mlp", "dot"):
            raise ValueError(f"auxiliary scorer: expected 'mlp' or 'dot', got {scorer!r}")
        if scorer == "dot" and state_dim != behaviour_dim:
            raise ValueError(
                f"auxiliary scorer 'dot' needs state_dim == behaviour_dim, got {state_dim}, {behaviour_dim}"
            )
        self.scorer = scorer
        self.mlp = (
            MLP(state_dim + behaviour_dim, list(hidden), activation, out_features=1)
            if scorer == "mlp"
            else None
        )
        #: Whether :meth:`forward` may take the fused sigmoid-MLP path (:mod:`din_torchrec.ops.pair_loss`);
        #: ``training.compile`` turns it off to compile :meth:`score_pairs` instead.
        self.fused = self.mlp is not None and activation == "sigmoid"

    def score(self, states: torch.Tensor, behaviours: torch.Tensor) -> torch.Tensor:
        """Logits ``[M]`` of aligned rows ``states [M, H]``, ``behaviours [M, D]``."""
        if self.mlp is None:
            return (states * behaviours).sum(-1)
        return self.mlp(torch.cat([states, behaviours], dim=-1)).squeeze(-1)

    def score_pairs(
        self, states: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``([M], [M])`` of each state ``[M, H]`` against its positive and its negative ``[M, D]``;
        equal to ``score(states, positives), score(states, negatives)``.

        The MLP's first layer is split, ``W [h, e] + b = W_h h + (W_e e + b)``: the state side is computed
        once for both (M rows instead of 2M), and the behaviour side of positives and negatives is one
        matmul whose accumulator starts from it (``addmm``: one rounding under bf16, as in one matmul on
        ``[h, e]``). The rest of the MLP runs once on all 2M rows, so a batch-statistics activation sees
        the same rows as in :meth:`score`.
        """
        m = states.shape[0]
        if self.mlp is None:
            return (states * positives).sum(-1), (states * negatives).sum(-1)
        first = self.mlp.layers[0]
        w_h, w_e = first.weight.split([states.shape[1], positives.shape[1]], dim=1)
        # Rows padded to a bucket under bf16 on the CPU: a bounded set of matmul shapes (see mlp.ROW_BUCKET).
        state_part = row_bucketed(lambda v: torch.addmm(first.bias, v, w_h.t()), states)
        x = row_bucketed(
            lambda v, c: torch.addmm(c, v, w_e.t()),
            torch.cat([positives, negatives]),
            torch.cat([state_part, state_part]),
        )
        pos, neg = self.mlp.forward_from(x, 1).squeeze(-1).split([m, m])
        return pos, neg

    def forward(
        self,
        states: torch.Tensor,
        behaviours: torch.Tensor,
        negatives: torch.Tensor,
        lengths: torch.Tensor,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss; the arguments as in :meth:`forward_unfused`, which this equals (``segments``:
        :func:`segment_ids` of ``lengths`` if the caller has it). With the paper's sigmoid scorer it is one
        autograd function (:func:`~din_torchrec.ops.pair_loss.sigmoid_mlp_pair_loss`: no row gathers, forward
        and backward chunk by chunk in cache: DIEN training steps +3 % in bf16, +13 % in float32 on the CPU)."""
        if self.fused and states.shape[0] > 0 and not torch.compiler.is_compiling():
            linears = [m for m in self.mlp.layers if isinstance(m, nn.Linear)]  # type: ignore[union-attr]
            return sigmoid_mlp_pair_loss(states, behaviours, negatives, lengths, linears, segments=segments)
        return self.forward_unfused(states, behaviours, negatives, lengths)

    def forward_unfused(
        self, states: torch.Tensor, behaviours: torch.Tensor, negatives: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Scalar loss, from the gathered pairs' rows through :meth:`score_pairs` (any scorer).

        Args:
            states: ``[N, H]`` jagged interest states (:class:`InterestExtractor` output).
            behaviours: ``[N, D]`` jagged behaviour embeddings (positives: row j + 1 is the next behaviour of
                row j within a sample).
            negatives: ``[N, D]`` one negative per position, aligned with ``behaviours``; row j + 1 is the
                negative for the pair (j, j + 1), so each sample's first negative is never used.
            lengths: ``[B]``.
        """
        segments = segment_ids(lengths)
        # Row j is the source of a pair iff row j + 1 belongs to the same sample.
        is_source = segments[:-1] == segments[1:]
        source = torch.nonzero(is_source).squeeze(1)
        target = source + 1
        n = segments.numel()
        to_target = inverse_index(target, n)
        pos, neg = self.score_pairs(
            gather_rows(states, source, inverse_index(source, n)),
            gather_rows(behaviours, target, to_target),
            gather_rows(negatives, target, to_target),
        )
        # BCE(x, 1) = softplus(-x), BCE(x, 0) = softplus(x); the sum over 0 pairs is 0, hence clamp, not NaN.
        total = F.softplus(-pos).sum() + F.softplus(neg).sum()
        return total / max(source.numel(), 1)

    def forward_reference(
        self, states: torch.Tensor, behaviours: torch.Tensor, negatives: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """Literal reference, per sample and per step, with ``binary_cross_entropy_with_logits``."""
        terms, start = [], 0
        for n in lengths.tolist():
            for t in range(n - 1):
                j = start + t
                pos = self.score(states[j : j + 1], behaviours[j + 1 : j + 2])
                neg = self.score(states[j : j + 1], negatives[j + 1 : j + 2])
                terms.append(
                    F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos))
                    + F.binary_cross_entropy_with_logits(neg, torch.zeros_like(neg))
                )
            start += n
        if not terms:
            return states.sum() * 0.0
        return torch.stack(terms).mean()
