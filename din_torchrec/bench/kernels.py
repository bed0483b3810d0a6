"""Fast paths against their plain references, forward + backward, at a given history length.

Every case runs both contenders on the same random jagged batch (lengths uniform in ``[0, T]``, so empty and
length-1 histories occur, or all ``T`` with ``lengths="full"``), checks that they agree (``max_abs_diff`` of
the outputs and of the input gradients), and times ``forward + backward`` of each in interleaved rounds
(fast, reference, fast, reference, ...): the best round of each counts, the medians are kept too.

Cases (the module each fast path lives in):

* ``din_attention``: :class:`~din_torchrec.modules.attention.TargetAttentionPooling` on the jagged ``[N, D]``
  values (no padding, split first layer as one matmul, Dice through the batch-norm kernel and
  ``DiceGate``) vs ``forward_padded`` (padded ``[B, T, D]`` block, concatenated ``[b, c, b-c, b*c]``,
  Dice's plain formula);
* ``din_attention_softmax``: the same with softmax normalisation (segment softmax vs a masked softmax);
* ``din_scores``: the unit's ``scores_jagged`` vs ``scores_reference`` (candidate rows repeated per
  behaviour);
* ``din_first_layer``: the unit's first layer alone, :func:`~din_torchrec.ops.jagged.first_layer` (float32 on the
  CPU: one weight matrix per sample, ``ops/lau_kernel.h``) vs one matmul on ``[b, b * c]``;
* ``dice`` / ``dice_vs_aten``: Dice in training mode on ``[N, H]`` (the native CPU kernel where built) vs its
  formula term by term / vs ATen's batch-norm kernel + ``DiceGate`` (the path without the kernel);
* ``dien_extractor``: :class:`~din_torchrec.modules.interest_evolution.InterestExtractor` (the single-node
  packed recurrence of :mod:`~din_torchrec.modules.recurrence`) vs ``nn.GRU`` over the padded block, and
  (``_vs_packed_gru``) vs ``nn.GRU`` on a ``PackedSequence``;
* ``dien_evolution``: ``InterestEvolution.forward`` (packed AUGRU recurrence, one autograd node) vs
  ``forward_reference`` (per sample, per step), vs a padded time loop (all B samples every step, masked) and
  vs ``forward_loop`` (the same packed loop with autograd recording every cell step);
* ``dien_augru``: the AUGRU recurrence alone, one autograd node vs the packed loop of ``AUGRUCell.step``;
* ``dien_aux_loss``: ``AuxiliaryNextBehaviourLoss.forward`` vs ``forward_reference`` (per pair);
* ``dien_aux_fused``: the same ``forward`` (sigmoid scorer: one autograd function, chunked, see
  :mod:`~din_torchrec.ops.pair_loss`) vs ``forward_unfused`` (gathered pairs through ``score_pairs``);
* ``dien_aux_kernel``: that function's native CPU kernel (``pair_loss_kernel.h``) vs its PyTorch chunk loop;
* ``linear_fp32``: a float32 linear layer on the batch's jagged rows through oneDNN's BRGEMM
  (:func:`~din_torchrec.ops.linear.linear`) vs ``F.linear`` (MKL's sgemm);
* ``dsin_extractor``: ``SessionInterestExtractor`` over all sessions of the batch at once vs a loop over
  sessions;
* ``dsin_sessions``: ``session_boundaries`` (vectorised) vs ``session_boundaries_reference`` (per-user loop;
  forward only, integer ids);
* ``seq_embedding_backward``: the sequence tables' fused backward + row-wise Adagrad update (FBGEMM's unpooled
  table-batched embedding, as TorchRec's ``EmbeddingCollection`` trains) through the native kernel of
  :mod:`~din_torchrec.ops.tbe` vs FBGEMM's own CPU kernel.

The per-sample / per-pair loops are slow by construction; their cases use a smaller batch (``loop_batch``).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def _gen(seed: int) -> torch.Generator:
    """A seeded generator on the default device (``torch.set_default_device`` moves every case there)."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


@dataclass
class Case:
    """Two contenders on the same inputs.

    ``fast`` / ``reference`` return a tensor (or a tuple); ``leaves`` are the inputs whose gradients are
    compared; ``modules`` own the parameters (their grads are reset before each call).
    """

    name: str
    fast: Callable[[], Outputs]
    reference: Callable[[], Outputs]
    leaves: list[torch.Tensor]
    modules: list[nn.Module]
    batch: int
    rows: int
    backward: bool = True
    reference_name: str = "reference"
    extra: dict[str, Any] = field(default_factory=dict)


def random_lengths(batch: int, history: int, mode: str, generator: torch.Generator) -> torch.Tensor:
    """``uniform``: in ``[0, T]`` with one empty and one length-1 history forced; ``full``: all T."""
    if mode == "full":
        return torch.full((batch,), history, dtype=torch.int64, device=generator.device)
    lengths = torch.randint(0, history + 1, (batch,), generator=generator, device=generator.device)
    if batch >= 2:
        lengths[0], lengths[1] = 0, 1
    return lengths


def pad(values: torch.Tensor, lengths: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged ``[N, D]`` -> padded ``[B, T, D]`` and mask ``[B, T]``."""
    mask = torch.arange(t, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)
    out = values.new_zeros(lengths.numel(), t, values.shape[-1])
    out[mask] = values
    return out, mask


def _first(x: Outputs) -> torch.Tensor:
    return x[0] if isinstance(x, tuple) else x


def _loss(out: Outputs, weights: dict[tuple[int, ...], torch.Tensor]) -> torch.Tensor:
    o = _first(out)
    if o.dim() == 0:
        return o
    w = weights.get(tuple(o.shape))
    if w is None:
        # On the output's device: the loss runs outside the `torch.device` context the case was built in.
        g = torch.Generator(device=o.device).manual_seed(7)
        w = torch.randn(o.shape, generator=g, dtype=o.dtype, device=o.device)
        weights[tuple(o.shape)] = w
    return (o * w).sum()


def _reset(case: Case) -> None:
    for leaf in case.leaves:
        leaf.grad = None
    for m in case.modules:
        for p in m.parameters():
            p.grad = None


def _call(
    case: Case, fn: Callable[[], Outputs], weights: dict, context: Callable[[], Any] = contextlib.nullcontext
) -> Outputs:
    _reset(case)
    if not case.backward:
        with torch.no_grad(), context():
            return fn()
    with context():
        out = fn()
        loss = _loss(out, weights)
    loss.float().backward()
    return out


def _max_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return float("nan") if (a is None) != (b is None) else 0.0
    if a.numel() == 0:
        return 0.0
    return float((a.detach().double() - b.detach().double()).abs().max())


def check(case: Case, context: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
    """Output and input-gradient differences between the two contenders."""
    weights: dict = {}
    fast = _call(case, case.fast, weights, context)
    fast_grads = [leaf.grad.clone() if leaf.grad is not None else None for leaf in case.leaves]
    ref = _call(case, case.reference, weights, context)
    ref_grads = [leaf.grad for leaf in case.leaves]
    out = {"max_abs_diff": _max_diff(_first(fast), _first(ref))}
    if case.backward:
        diffs = [_max_diff(a, b) for a, b in zip(fast_grads, ref_grads)]
        if "padded_grad_check" in case.extra:  # jagged leaf vs padded leaf: compare at the real positions
            jagged, padded, mask = case.extra["padded_grad_check"]
            _call(case, case.fast, weights, context)
            jagged_grad = jagged.grad.clone()
            _call(case, case.reference, weights, context)
            diffs.append(_max_diff(jagged_grad, padded.grad[mask]))
        out["max_abs_grad_diff"] = max(diffs, default=0.0)
    return out


def time_case(
    case: Case,
    rounds: int,
    target_s: float,
    context: Callable[[], Any] = contextlib.nullcontext,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Interleaved rounds of ``forward + backward`` of each contender (after one warm-up call each);
    ``context`` wraps each forward (autocast), ``sync`` waits for the device before reading the clock."""
    weights: dict = {}

    def timed(fn: Callable[[], Outputs], iters: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            _call(case, fn, weights, context)
        sync()
        return (time.perf_counter() - t0) / iters

    iters = []
    for fn in (case.fast, case.reference):
        once = timed(fn, 1)  # warm-up and calibration
        iters.append(int(max(1, min(100, target_s / max(once, 1e-6)))))
    fast_t: list[float] = []
    ref_t: list[float] = []
    for _ in range(rounds):
        fast_t.append(timed(case.fast, iters[0]))
        ref_t.append(timed(case.reference, iters[1]))
    return {
        "fast_ms": min(fast_t) * 1e3,
        "reference_ms": min(ref_t) * 1e3,
        "fast_ms_median": statistics.median(fast_t) * 1e3,
        "reference_ms_median": statistics.median(ref_t) * 1e3,
        "speedup": min(ref_t) / min(fast_t),
        "speedup_median": statistics.median(ref_t) / statistics.median(fast_t),
        "samples_per_s_fast": case.batch / min(fast_t),
        "samples_per_s_reference": case.batch / min(ref_t),
    }


# ----------------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------------


def din_attention_case(
    batch: int,
    history: int,
    dim: int,
    hidden: list[int],
    activation: str,
    normalization: str,
    lengths_mode: str,
    seed: int,
) -> Case:
    """``TargetAttentionPooling.forward`` (jagged rows, split first layer, fused Dice) against
    ``forward_padded`` (the padded block, the concatenated first layer, Dice's plain formula)."""
    from din_torchrec.modules.attention import TargetAttentionPooling

    g = _gen(seed)
    torch.manual_seed(seed)
    att = TargetAttentionPooling(dim, hidden, activation, normalization)
    lengths = random_lengths(batch, history, lengths_mode, g)
    n = int(lengths.sum())
    beh = torch.randn(n, dim, generator=g).requires_grad_()
    cand = torch.randn(batch, dim, generator=g).requires_grad_()
    padded, mask = pad(beh.detach(), lengths, history)
    padded.requires_grad_()

    def fast() -> Outputs:
        return att(beh, lengths, cand)[0]

    def ref() -> Outputs:
        return att.forward_padded(padded, mask, cand)[0]

    name = "din_attention" + ("_softmax" if normalization == "softmax" else "")
    case = Case(name, fast, ref, [cand], [att], batch, n, reference_name="forward_padded")
    case.extra["padded_grad_check"] = (beh, padded, mask)
    return case


def dice_case(batch: int, history: int, hidden: int, lengths_mode: str, seed: int, reference: str) -> Case:
    """Dice in training mode on the ``[N, H]`` activations of a jagged batch: ``Dice.forward`` (the native
    CPU kernel where it is built) against ``forward_reference`` (the formula term by term) or, with
    ``reference="aten"``, against ``forward_aten`` (ATen's batch-norm kernel + DiceGate, the fallback)."""
    from din_torchrec.modules.activations import Dice

    g = _gen(seed)
    torch.manual_seed(seed)
    dice = Dice(hidden)
    with torch.no_grad():
        dice.alpha.uniform_(-0.5, 0.5, generator=g)
    lengths = random_lengths(batch, history, lengths_mode, g)
    n = int(lengths.sum())
    x = (torch.randn(n, hidden, generator=g) * 2 + 0.5).requires_grad_()
    if reference == "aten":
        name, ref, ref_name = (
            "dice_vs_aten",
            (lambda: dice.forward_aten(x)),
            "forward_aten (batch norm + DiceGate)",
        )
    else:
        name, ref, ref_name = "dice", (lambda: dice.forward_reference(x)), "forward_reference"
    return Case(name, lambda: dice(x), ref, [x], [dice], batch, n, reference_name=ref_name)


def din_scores_case(
    batch: int,
    history: int,
    dim: int,
    hidden: list[int],
    activation: str,
    lengths_mode: str,
    seed: int,
) -> Case:
    from din_torchrec.modules.attention import LocalActivationUnit, segment_ids

    g = _gen(seed)
    torch.manual_seed(seed)
    unit = LocalActivationUnit(dim, hidden, activation)
    lengths = random_lengths(batch, history, lengths_mode, g)
    n = int(lengths.sum())
    beh = torch.randn(n, dim, generator=g).requires_grad_()
    cand = torch.randn(batch, dim, generator=g).requires_grad_()
    seg = segment_ids(lengths)
    return Case(
        "din_scores",
        lambda: unit.scores_jagged(beh, cand, seg),
        lambda: unit.scores_reference(beh, cand.index_select(0, seg)),
        [beh, cand],
        [unit],
        batch,
        n,
        reference_name="scores_reference",
    )


def din_first_layer_case(
    batch: int, history: int, dim: int, hidden: int, lengths_mode: str, seed: int
) -> Case:
    """The attention unit's first layer alone: :func:`~din_torchrec.ops.jagged.first_layer` (float32 on the CPU:
    the per-sample weight matrix kernel) vs ``first_layer_reference`` (one matmul on ``[b, b * c]``)."""
    from din_torchrec.modules.attention import segment_ids
    from din_torchrec.ops.jagged import first_layer, first_layer_reference

    g = _gen(seed)
    lengths = random_lengths(batch, history, lengths_mode, g)
    n = int(lengths.sum())
    seg = segment_ids(lengths)
    beh = torch.randn(n, dim, generator=g).requires_grad_()
    cand = torch.randn(batch, dim, generator=g).requires_grad_()
    a, p = (torch.randn(hidden, dim, generator=g).div_(dim**0.5).requires_grad_() for _ in range(2))
    k = torch.randn(batch, hidden, generator=g).requires_grad_()
    return Case(
        "din_first_layer",
        lambda: first_layer(beh, cand, seg, a, p, k),
        lambda: first_layer_reference(beh, cand, seg, a, p, k),
        [beh, cand, a, p, k],
        [],
        batch,
        n,
        reference_name="first_layer_reference ([b, b*c] matmul)",
    )


def dien_extractor_case(
    batch: int, history: int, dim: int, hidden: int, lengths_mode: str, seed: int, reference: str = "padded"
) -> Case:
    """``InterestExtractor.forward`` (the single-node packed recurrence) against the padded ``nn.GRU``
    (``reference="padded"``) or ``nn.GRU`` on a ``PackedSequence`` (``"packed"``, ``forward_packed``)."""
    from din_torchrec.modules.interest_evolution import InterestExtractor

    g = _gen(seed)
    torch.manual_seed(seed)
    ex = InterestExtractor(dim, hidden)
    lengths = random_lengths(batch, history, lengths_mode, g)
    n = int(lengths.sum())
    beh = torch.randn(n, dim, generator=g).requires_grad_()

    def padded() -> Outputs:
        # Padded block through nn.GRU (every step of every sample); states read back at the real positions.
        block, mask = pad(beh, lengths, history)
        out, _ = ex.gru(block.transpose(0, 1))
        return out.transpose(0, 1)[mask]

    def packed() -> Outputs:
        return ex.forward_packed(beh, lengths)[0]

    if reference == "packed":
        name, ref, ref_name = "dien_extractor_vs_packed_gru", packed, "nn.GRU on a PackedSequence"
    else:
        name, ref, ref_name = "dien_extractor", padded, "padded nn.GRU"
    return Case(name, lambda: ex(beh, lengths)[0], ref, [beh], [ex], batch, n, reference_name=ref_name)


def _evolution_padded(
    evo: nn.Module, states: torch.Tensor, lengths: torch.Tensor, cand: torch.Tensor, t: int
) -> torch.Tensor:
    """A padded time loop (the DeepCTR-style recurrence): every step runs the cell on all B samples and masks
    the update; attention scored on the real rows only (so Dice sees the same statistics as the fast path)."""
    from din_torchrec.modules.attention import segment_ids
    from din_torchrec.modules.attention_family import masked_softmax

    seg = segment_ids(lengths)
    scores = evo.unit.scores_reference(states, evo.candidate_projection(cand).index_select(0, seg))
    padded, mask = pad(states, lengths, t)
    att = masked_softmax(scores.new_zeros(mask.shape).masked_scatter(mask, scores), mask)
    h = states.new_zeros(lengths.numel(), evo.hidden_size)
    for step in range(t):
        h_new = evo.cell(padded[:, step], h, att[:, step])
        h = torch.where(mask[:, step : step + 1], h_new, h)
    return h


def dien_evolution_case(
    batch: int,
    history: int,
    hidden: int,
    att_hidden: list[int],
    activation: str,
    lengths_mode: str,
    seed: int,
    reference: str,
) -> Case:
    from din_torchrec.modules.interest_evolution import InterestEvolution

    g = _gen(seed)
    torch.manual_seed(seed)
    evo = InterestEvolution(hidden, hidden, hidden, "augru", att_hidden, activation)
    lengths = random_lengths(batch, history, lengths_mode, g)
    n = int(lengths.sum())
    states = torch.randn(n, hidden, generator=g).requires_grad_()
    cand = torch.randn(batch, hidden, generator=g).requires_grad_()
    if reference == "loop":
        ref: Callable[[], Outputs] = lambda: evo.forward_reference(states, lengths, cand)[0]  # noqa: E731
        name, ref_name = "dien_evolution", "forward_reference (per sample, per step)"
    elif reference == "autograd":
        ref = lambda: evo.forward_loop(states, lengths, cand)[0]  # noqa: E731
        name, ref_name = "dien_evolution_vs_autograd_loop", "packed loop of cell steps under autograd"
    else:
        ref = lambda: _evolution_padded(evo, states, lengths, cand, history)  # noqa: E731
        name, ref_name = "dien_evolution_vs_padded", "padded time loop (all samples every step)"
    return Case(
        name,
        lambda: evo(states, lengths, cand)[0],
        ref,
        [states, cand],
        [evo],
        batch,
        n,
        reference_name=ref_name,
    )


def dien_augru_case(batch: int, history: int, hidden: int, lengths_mode: str, seed: int) -> Case:
    """The AUGRU recurrence alone (no attention): :func:`~din_torchrec.modules.recurrence.packed_recurrence`
    (one autograd node) vs the same packed loop of ``AUGRUCell.step`` under autograd."""
    from din_torchrec.modules.interest_evolution import AUGRUCell, packed_layout
    from din_torchrec.modules.recurrence import packed_recurrence

    g = _gen(seed)
    torch.manual_seed(seed)
    cell = AUGRUCell(hidden, hidden)
    lengths = random_lengths(batch, history, lengths_mode, g)
    steps = packed_layout(lengths).steps
    n = int(lengths.sum())
    x = torch.randn(n, hidden, generator=g).requires_grad_()
    att = torch.rand(n, generator=g).requires_grad_()

    def fast() -> Outputs:
        return packed_recurrence(cell.project_input(x), att, cell.weight_hh, None, steps, "augru", cell.bias)

    def loop() -> Outputs:
        # As InterestEvolution.forward_loop: `split`, not slicing, for the shrinking batch (a slice's backward
        # writes a zero-filled copy of the whole tensor each step, which would flatter the fast path).
        outs, h = [], x.new_zeros(steps[0] if steps else 0, hidden)
        x_steps = cell.project_input(x).split(steps)
        for x_t, a_t, b in zip(x_steps, att.split(steps), steps):
            if b < h.shape[0]:
                h = h.split([b, h.shape[0] - b])[0]
            h = cell.step(x_t, h, a_t)
            outs.append(h)
        return torch.cat(outs)

    return Case(
        "dien_augru", fast, loop, [x, att], [cell], batch, n, reference_name="packed loop of AUGRUCell.step"
    )


def linear_case(batch: int, history: int, width: int, out: int, lengths_mode: str, seed: int) -> Case:
    """A float32 linear layer on a batch's N jagged rows (the attention MLP's second layer, ``[N, 80] -> 40``):
    :func:`~din_torchrec.ops.linear.linear` (oneDNN's BRGEMM on the CPU) vs ``F.linear`` (MKL's sgemm)."""
    import torch.nn.functional as F

    from din_torchrec.ops.linear import linear

    g = _gen(seed)
    lengths = random_lengths(batch, history, lengths_mode, g)
    n = int(lengths.sum())
    x = torch.randn(n, width, generator=g).requires_grad_()
    w = torch.randn(out, width, generator=g).div_(width**0.5).requires_grad_()
    b = torch.randn(out, generator=g).requires_grad_()
    return Case(
        "linear_fp32",
        lambda: linear(x, w, b),
        lambda: F.linear(x, w, b),
        [x, w, b],
        [],
        batch,
        n,
        reference_name="F.linear (MKL sgemm)",
    )


@contextlib.contextmanager
def _pair_loss_pytorch_loop():
    """The auxiliary loss's PyTorch chunk loop instead of its native kernel, for the duration."""
    from din_torchrec.ops import pair_loss

    usable = pair_loss.native_usable
    pair_loss.native_usable = lambda *args: False
    try:
        yield
    finally:
        pair_loss.native_usable = usable


def dien_aux_case(
    batch: int, history: int, hidden: int, dim: int, lengths_mode: str, seed: int, against: str = "loop"
) -> Case:
    """``against``: ``loop`` (per-pair reference), ``unfused`` (gathered pairs) or ``chunk_loop`` (the fused
    function's PyTorch chunk loop instead of its native kernel)."""
    from din_torchrec.modules.interest_evolution import AuxiliaryNextBehaviourLoss

    g = _gen(seed)
    torch.manual_seed(seed)
    aux = AuxiliaryNextBehaviourLoss(hidden, dim, "mlp", (100, 50))
    lengths = random_lengths(batch, history, lengths_mode, g)
    n = int(lengths.sum())
    states = torch.randn(n, hidden, generator=g).requires_grad_()
    beh = torch.randn(n, dim, generator=g).requires_grad_()
    neg = torch.randn(n, dim, generator=g).requires_grad_()

    def chunk_loop(*args: torch.Tensor) -> torch.Tensor:
        with _pair_loss_pytorch_loop():
            return aux(*args)

    name, reference, reference_name = {
        "unfused": ("dien_aux_fused", aux.forward_unfused, "forward_unfused (gathered pairs, score_pairs)"),
        "chunk_loop": ("dien_aux_kernel", chunk_loop, "the PyTorch chunk loop (_chunk_loop)"),
        "loop": ("dien_aux_loss", aux.forward_reference, "forward_reference (per pair)"),
    }[against]
    return Case(
        name,
        lambda: aux(states, beh, neg, lengths),
        lambda: reference(states, beh, neg, lengths),
        [states, beh, neg],
        [aux],
        batch,
        n,
        reference_name=reference_name,
    )


def _random_timestamps(lengths: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Oldest first; a third of the gaps open a session (gap 3600 s > 1800 s)."""
    n = int(lengths.sum())
    gaps = torch.where(torch.rand(n, generator=g, device=g.device) < 0.33, 3600, 60)
    return 1_700_000_000 + torch.cumsum(gaps, 0)


def dsin_extractor_case(
    batch: int,
    history: int,
    dim: int,
    heads: int,
    max_sessions: int,
    max_len: int,
    lengths_mode: str,
    seed: int,
) -> Case:
    from din_torchrec.modules.session_interest import SessionInterestExtractor
    from din_torchrec.modules.sessions import sessionize

    g = _gen(seed)
    torch.manual_seed(seed)
    ex = SessionInterestExtractor(dim, heads)
    lengths = random_lengths(batch, history, lengths_mode, g)
    n = int(lengths.sum())
    values = torch.randn(n, dim, generator=g)
    sessions, bmask, _ = sessionize(
        values, _random_timestamps(lengths, g), lengths, 1800, max_sessions, max_len
    )
    sessions.requires_grad_()
    b, k, sl, d = sessions.shape
    counts = bmask.sum(-1).tolist()

    def ref() -> Outputs:
        rows = []
        for i in range(b):
            for j in range(k):
                c = counts[i][j]
                if c == 0:
                    rows.append(sessions.new_zeros(d))
                    continue
                h = ex.encode(sessions[i, j, :c].unsqueeze(0), bmask[i, j, :c].unsqueeze(0))
                rows.append(h[0].mean(0))
        return torch.stack(rows).view(b, k, d)

    return Case(
        "dsin_extractor",
        lambda: ex(sessions, bmask),
        ref,
        [sessions],
        [ex],
        batch,
        int(bmask.sum()),
        reference_name="loop over sessions",
    )


def dsin_sessions_case(batch: int, history: int, lengths_mode: str, seed: int) -> Case:
    from din_torchrec.modules.sessions import session_boundaries, session_boundaries_reference

    g = _gen(seed)
    lengths = random_lengths(batch, history, lengths_mode, g)
    ts = _random_timestamps(lengths, g)
    return Case(
        "dsin_sessions",
        lambda: session_boundaries(ts, lengths, 1800).float(),
        lambda: session_boundaries_reference(ts, lengths, 1800).float(),
        [],
        [],
        batch,
        int(lengths.sum()),
        backward=False,
        reference_name="session_boundaries_reference (per-user loop)",
    )


def seq_embedding_backward_case(batch: int, history: int, dim: int, lengths_mode: str, seed: int) -> Case:
    """The sequence tables' training step as TorchRec's fused ``EmbeddingCollection`` runs it on the CPU: an
    FBGEMM unpooled table-batched embedding with the row-wise Adagrad optimizer fused into its backward. Fast:
    the backward through the native kernel (:mod:`~din_torchrec.ops.tbe`); reference: FBGEMM's own
    CPU kernel. Two tables shared by four features as in DIN / DIEN (history and candidate item, 1M rows;
    history and candidate category, 1,000 rows), skewed ids (repeats, as in behaviour logs). Each call is
    forward + backward + update on its own copy of the tables; the outputs compared are rows of the updated
    item table."""
    import copy

    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        EmbeddingLocation,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    from din_torchrec.ops import tbe

    g = _gen(seed)
    lengths = random_lengths(batch, history, lengths_mode, g)
    n = int(lengths.sum())
    rows = [1_000_000, 1_000]
    fast_tables = SplitTableBatchedEmbeddingBagsCodegen(
        [(r, dim, EmbeddingLocation.HOST, ComputeDevice.CPU) for r in rows],
        feature_table_map=[0, 0, 1, 1],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        pooling_mode=PoolingMode.NONE,
        learning_rate=0.05,
        eps=1e-8,
    )
    ref_tables = copy.deepcopy(fast_tables)
    ones = torch.ones(batch, dtype=torch.long)
    per_bag = torch.cat([lengths, ones, lengths, ones])

    def ids(r: int, k: int) -> torch.Tensor:
        return (torch.rand(k, generator=g) ** 4 * r).long()

    indices = torch.cat([ids(rows[0], n), ids(rows[0], batch), ids(rows[1], n), ids(rows[1], batch)])
    offsets = torch.zeros(per_bag.numel() + 1, dtype=torch.long)
    offsets[1:] = per_bag.cumsum(0)
    grad = torch.randn(indices.numel(), dim, generator=g)
    probe = indices[: min(1024, n + batch)]  # item-table rows (table 0 starts at row 0)

    def step(tables: SplitTableBatchedEmbeddingBagsCodegen, native_kernel: bool) -> torch.Tensor:
        with tbe.registration_restored(), torch.enable_grad():
            (tbe.install if native_kernel else tbe.uninstall)()
            tables(indices, offsets).backward(grad)
        return tables.weights_host.view(-1, dim).index_select(0, probe)

    return Case(
        "seq_embedding_backward",
        lambda: step(fast_tables, True),
        lambda: step(ref_tables, False),
        [],
        [],
        batch,
        int(indices.numel()),
        backward=False,
        reference_name="FBGEMM's split_embedding_nobag_backward_codegen_rowwise_adagrad_cpu",
    )


@dataclass
class KernelSettings:
    history: int = 200
    batch: int = 1024
    loop_batch: int = 32
    dim: int = 32
    hidden: list[int] = field(default_factory=lambda: [80, 40])
    activation: str = "dice"
    lengths: str = "uniform"
    rounds: int = 3
    target_s: float = 0.5
    seed: int = 0
    dsin_heads: int = 4
    dsin_max_sessions: int = 5
    dsin_max_session_length: int = 10
    cases: list[str] = field(default_factory=list)


PRESETS = {
    "small": dict(
        history=20, batch=16, loop_batch=6, dim=8, hidden=[8, 4], rounds=1, target_s=0.01, dsin_heads=2
    ),
    "full": dict(history=200, batch=1024, loop_batch=32, dim=32, hidden=[80, 40], rounds=3, target_s=0.5),
}


def build_cases(s: KernelSettings) -> list[Case]:
    t, b, lb, d = s.history, s.batch, s.loop_batch, s.dim
    builders: dict[str, Callable[[], Case]] = {
        "din_attention": lambda: din_attention_case(
            b, t, d, s.hidden, s.activation, "none", s.lengths, s.seed
        ),
        "din_attention_softmax": lambda: din_attention_case(
            b, t, d, s.hidden, s.activation, "softmax", s.lengths, s.seed
        ),
        "din_scores": lambda: din_scores_case(b, t, d, s.hidden, s.activation, s.lengths, s.seed),
        "din_first_layer": lambda: din_first_layer_case(b, t, d, s.hidden[0], s.lengths, s.seed),
        "dice": lambda: dice_case(b, t, s.hidden[0], s.lengths, s.seed, "formula"),
        "dice_vs_aten": lambda: dice_case(b, t, s.hidden[0], s.lengths, s.seed, "aten"),
        "dien_extractor": lambda: dien_extractor_case(b, t, d, d, s.lengths, s.seed),
        "dien_extractor_vs_packed_gru": lambda: dien_extractor_case(b, t, d, d, s.lengths, s.seed, "packed"),
        "dien_evolution": lambda: dien_evolution_case(
            lb, t, d, s.hidden, s.activation, s.lengths, s.seed, "loop"
        ),
        "dien_evolution_vs_padded": lambda: dien_evolution_case(
            b, t, d, s.hidden, s.activation, s.lengths, s.seed, "padded"
        ),
        "dien_evolution_vs_autograd_loop": lambda: dien_evolution_case(
            b, t, d, s.hidden, s.activation, s.lengths, s.seed, "autograd"
        ),
        "dien_augru": lambda: dien_augru_case(b, t, d, s.lengths, s.seed),
        "dien_aux_loss": lambda: dien_aux_case(lb, t, d, d, s.lengths, s.seed),
        "dien_aux_fused": lambda: dien_aux_case(b, t, d, d, s.lengths, s.seed, "unfused"),
        "dien_aux_kernel": lambda: dien_aux_case(b, t, d, d, s.lengths, s.seed, "chunk_loop"),
        "linear_fp32": lambda: linear_case(b, t, s.hidden[0], s.hidden[-1], s.lengths, s.seed),
        "dsin_extractor": lambda: dsin_extractor_case(
            b, t, d, s.dsin_heads, s.dsin_max_sessions, s.dsin_max_session_length, s.lengths, s.seed
        ),
        "dsin_sessions": lambda: dsin_sessions_case(b, t, s.lengths, s.seed),
        "seq_embedding_backward": lambda: seq_embedding_backward_case(b, t, d, s.lengths, s.seed),
    }
    names = s.cases or list(builders)
    unknown = [n for n in names if n not in builders]
    if unknown:
        raise ValueError(f"kernels: unknown cases {unknown}; known: {sorted(builders)}")
    return [builders[n]() for n in names]


def run_kernels(
    s: KernelSettings, out_dir: str | Path, preset: str = "", log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Check and time every case; write ``kernels.json`` and ``kernels.png`` into ``out_dir``."""
    from din_torchrec.bench.embeddings import machine_info
    from din_torchrec.bench.plots import plot_speedups
    from din_torchrec.utils.allocator import tune_malloc

    tune_malloc()  # as training runs (training.malloc_tuning): both sides of every case get it
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = []
    for case in build_cases(s):
        diffs = check(case)
        timing = time_case(case, s.rounds, s.target_s)
        row = {
            "name": case.name,
            "reference": case.reference_name,
            "batch": case.batch,
            "history": s.history,
            "rows": case.rows,
            "backward": case.backward,
            **diffs,
            **timing,
        }
        results.append(row)
        log(
            f"{case.name:<26} B={case.batch:<4} N={case.rows:<6} fast {timing['fast_ms']:9.2f} ms  "
            f"ref {timing['reference_ms']:10.2f} ms  x{timing['speedup']:7.1f} (median x{timing['speedup_median']:.1f})  "
            f"max diff {diffs['max_abs_diff']:.1e}"
        )
    report = {
        "benchmark": "kernels",
        "preset": preset,
        "machine": machine_info(),
        "settings": {k: v for k, v in s.__dict__.items()},
        "timing": "forward + backward per call; best of interleaved rounds (fast, reference, fast, ...)",
        "results": results,
        "wall_seconds": time.perf_counter() - t0,
    }
    (out / "kernels.json").write_text(json.dumps(report, indent=2))
    plot_speedups(
        report,
        out / "kernels.png",
        f"fast paths vs references, history {s.history} ({s.lengths} lengths), dim {s.dim}, {torch.get_num_threads()} threads",
    )
    return report
