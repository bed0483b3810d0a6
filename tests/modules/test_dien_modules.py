"""DIEN modules: the attentional GRU cells against their equations, the jagged interest extractor against
``nn.GRU`` per sample, the packed interest evolution against its per-sample reference, and the auxiliary loss
over real steps only."""

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from din_torchrec.modules.interest_evolution import (
    EVOLUTION_KINDS,
    AuxiliaryNextBehaviourLoss,
    InterestEvolution,
    InterestExtractor,
    make_evolution_cell,
    packed_layout,
    segment_softmax,
)


def _offsets(lengths: torch.Tensor) -> list[int]:
    return [0, *torch.cumsum(lengths, 0).tolist()]


def _pad(
    values: torch.Tensor, lengths: torch.Tensor, t: int, fill: torch.Tensor | None = None
) -> torch.Tensor:
    """``[N, D]`` jagged -> ``[B, T, D]``; padding from ``fill`` (``[B, T, D]``) or zeros."""
    b, d = lengths.numel(), values.shape[-1]
    out = values.new_zeros(b, t, d) if fill is None else fill.clone()
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    out[mask] = values
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cells
# ---------------------------------------------------------------------------------------------------------------


def _cell_equations(kind: str, cell, xs: torch.Tensor, h: torch.Tensor, atts: torch.Tensor) -> torch.Tensor:
    """The DIEN paper's equations, written out with the cell's weights (gate rows [u, r, h~] or [r, h~])."""
    hidden = cell.hidden_size
    w, u_mat, b = cell.weight_ih.split(hidden), cell.weight_hh.split(hidden), cell.bias.split(hidden)
    if kind == "agru":
        (w_r, w_h), (u_r, u_h), (b_r, b_h) = w, u_mat, b
    else:
        (w_u, w_r, w_h), (u_u, u_r, u_h), (b_u, b_r, b_h) = w, u_mat, b
    for x, a in zip(xs, atts):
        a = a.unsqueeze(1)
        i = a * x if kind == "aigru" else x  # AIGRU: attention scales the input of a plain GRU
        r = torch.sigmoid(i @ w_r.T + h @ u_r.T + b_r)
        h_tilde = torch.tanh(i @ w_h.T + r * (h @ u_h.T) + b_h)
        if kind == "agru":
            h = (1 - a) * h + a * h_tilde
        else:
            u = torch.sigmoid(i @ w_u.T + h @ u_u.T + b_u)
            if kind == "augru":
                u = a * u
            h = (1 - u) * h + u * h_tilde
    return h


@pytest.mark.parametrize("kind", EVOLUTION_KINDS)
def test_cells_follow_their_equations_forward_and_grad(kind: str) -> None:
    torch.manual_seed(0)
    steps, b, i, hidden = 4, 5, 3, 6
    cell = make_evolution_cell(kind, i, hidden)
    assert cell.weight_ih.shape[0] == (2 if kind == "agru" else 3) * hidden, "AGRU has no update gate"
    xs = torch.randn(steps, b, i, requires_grad=True)
    atts = torch.rand(steps, b)
    h0 = torch.randn(b, hidden)
    h = h0
    for x, a in zip(xs, atts):
        h = cell(x, h, a)
    ref = _cell_equations(kind, cell, xs, h0, atts)
    torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn(b, hidden)
    grads = torch.autograd.grad((h * g).sum(), [xs, *cell.parameters()])
    ref_grads = torch.autograd.grad((ref * g).sum(), [xs, *cell.parameters()])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_cells_respond_to_attention_as_their_kind_says() -> None:
    torch.manual_seed(1)
    x, h = torch.randn(3, 4), torch.randn(3, 5)
    zero, one = torch.zeros(3), torch.ones(3)
    augru, agru, aigru = (make_evolution_cell(k, 4, 5) for k in ("augru", "agru", "aigru"))
    # AUGRU/AGRU with zero attention must not move the state at all (the gate is the attention).
    torch.testing.assert_close(augru(x, h, zero), h)
    torch.testing.assert_close(agru(x, h, zero), h)
    # AIGRU with zero attention sees a zero input but still updates: the GRU runs on (0, h).
    torch.testing.assert_close(aigru(x, h, zero), aigru(torch.zeros_like(x), h, one))
    assert (aigru(x, h, zero) - h).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Packed layout and interest extractor
# ---------------------------------------------------------------------------------------------------------------


def test_packed_layout_puts_step_t_of_the_longest_samples_first() -> None:
    lengths = torch.tensor([2, 0, 4, 2, 1, 4])
    lay = packed_layout(lengths)
    offsets = _offsets(lengths)
    assert lay.steps == [5, 4, 2, 2]
    assert lay.order.tolist() == [2, 5, 0, 3, 4, 1]  # by length descending, ties in batch order
    assert lay.order[lay.inverse_order].tolist() == list(range(6))
    expected: list[int] = []
    for t, active in enumerate(lay.steps):
        expected += [offsets[s] + t for s in lay.order[:active].tolist()]
    assert lay.packed_index.tolist() == expected
    assert lay.packed_index[lay.unpack_index].tolist() == list(range(int(lengths.sum())))
    # The packed row of each non-empty rank's last step (the recurrence's final states).
    last = [int(lay.unpack_index[offsets[s] + int(lengths[s]) - 1]) for s in lay.order[:5].tolist()]
    assert lay.last_rows.tolist() == last == [11, 12, 7, 8, 4]
    assert lay.segments.tolist() == [0, 0, 2, 2, 2, 2, 3, 3, 4, 5, 5, 5, 5]


def _gru_per_sample(ex: InterestExtractor, beh: torch.Tensor, lengths: torch.Tensor):
    states, finals, start = [], [], 0
    for n in lengths.tolist():
        if n == 0:
            finals.append(beh.new_zeros(ex.hidden_size))
        else:
            out, h_n = ex.gru(beh[start : start + n].unsqueeze(1))  # [n, 1, D]: one unpadded sequence
            states.append(out[:, 0])
            finals.append(h_n[0, 0])
        start += n
    return torch.cat(states) if states else beh.new_zeros(0, ex.hidden_size), torch.stack(finals)


@pytest.mark.parametrize("lengths", [[3, 0, 1, 5, 2, 5], [1], [0, 0], [4, 4, 4]])
def test_extractor_equals_nn_gru_per_sample_forward_and_grad(lengths: list[int]) -> None:
    torch.manual_seed(2)
    ex = InterestExtractor(4, 6)
    lens = torch.tensor(lengths)
    beh = torch.randn(int(lens.sum()), 4, requires_grad=True)
    states, final = ex(beh, lens)
    ref_states, ref_final = _gru_per_sample(ex, beh, lens)
    assert states.shape == (int(lens.sum()), 6) and final.shape == (len(lengths), 6)
    torch.testing.assert_close(states, ref_states, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final, ref_final, rtol=1e-5, atol=1e-6)
    assert torch.all(final[lens == 0] == 0), "an empty history must give a zero final state"
    if lens.sum() == 0:
        return
    g_s, g_f = torch.randn_like(states), torch.randn_like(final)
    params = list(ex.parameters())
    grads = torch.autograd.grad((states * g_s).sum() + (final * g_f).sum(), [beh, *params])
    ref_grads = torch.autograd.grad((ref_states * g_s).sum() + (ref_final * g_f).sum(), [beh, *params])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_extractor_equals_torch_packing_of_a_padded_block_with_garbage_padding() -> None:
    """Torch's own packing of a padded block whose padding holds large garbage: if our layout put a padded
    step (or another sample's row) into a sample's sequence, the outputs would differ."""
    torch.manual_seed(3)
    ex = InterestExtractor(5, 4)
    lens = torch.tensor([3, 7, 1, 7, 2])
    beh = torch.randn(int(lens.sum()), 5)
    padded = _pad(beh, lens, 9, fill=torch.randn(5, 9, 5) * 100)
    out, h_n = ex.gru(pack_padded_sequence(padded, lens, batch_first=True, enforce_sorted=False))
    ref_padded, _ = pad_packed_sequence(out, batch_first=True)
    mask = torch.arange(ref_padded.shape[1]).unsqueeze(0) < lens.unsqueeze(1)
    states, final = ex(beh, lens)
    torch.testing.assert_close(states, ref_padded[mask], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final, h_n[0], rtol=1e-5, atol=1e-6)


def test_extractor_sample_outputs_do_not_depend_on_the_rest_of_the_batch() -> None:
    """A sample's states are the same alone, in a batch, and when a neighbour's history is extended (a longer
    neighbour adds steps that the short sample must not run); extending a sample's own history leaves its
    earlier states unchanged (the GRU is causal) and moves its final state to the new last step."""
    torch.manual_seed(4)
    ex = InterestExtractor(3, 5)
    a, b, extra = torch.randn(2, 3), torch.randn(4, 3), torch.randn(6, 3)
    s_alone, f_alone = ex(a, torch.tensor([2]))
    s_pair, f_pair = ex(torch.cat([a, b]), torch.tensor([2, 4]))
    s_ext, f_ext = ex(torch.cat([a, b, extra]), torch.tensor([2, 10]))
    for s, f in ((s_pair, f_pair), (s_ext, f_ext)):
        torch.testing.assert_close(s[:2], s_alone)
        torch.testing.assert_close(f[0], f_alone[0])
    torch.testing.assert_close(s_ext[2:6], s_pair[2:6])  # b's first 4 steps, before its extension
    torch.testing.assert_close(f_ext[1], s_ext[-1])
    assert (f_ext[1] - f_pair[1]).abs().max() > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Interest evolution
# ---------------------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=8),
    kind=st.sampled_from(EVOLUTION_KINDS),
    activation=st.sampled_from(["dice", "prelu"]),
    candidate_dim=st.sampled_from([4, 3]),
    seed=st.integers(0, 2**16),
)
def test_evolution_fast_path_equals_per_sample_reference_forward_and_grad(
    lengths, kind, activation, candidate_dim, seed
) -> None:
    torch.manual_seed(seed)
    h_in = 4  # candidate_dim 3 exercises the candidate projection, 4 the identity
    # float64: Dice on a batch of 2-3 rows divides by a near-zero std, which amplifies float32 rounding (the
    # two paths order the first layer's sums differently) past any sensible tolerance.
    ev = InterestEvolution(
        h_in, 5, candidate_dim, kind=kind, attention_hidden=[6, 3], attention_activation=activation
    ).double()
    lens = torch.tensor(lengths)
    states = torch.randn(int(lens.sum()), h_in, dtype=torch.float64, requires_grad=True)
    cand = torch.randn(lens.numel(), candidate_dim, dtype=torch.float64, requires_grad=True)
    inputs = [states, cand, *ev.parameters()]

    final, att = ev(states, lens, cand)
    ref_final, ref_att = ev.forward_reference(states, lens, cand)
    assert final.shape == (lens.numel(), 5) and att.shape == (int(lens.sum()),)
    torch.testing.assert_close(final, ref_final, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(att, ref_att, rtol=1e-9, atol=1e-10)
    assert torch.all(final[lens == 0] == 0)
    # Random weights: a plain att.sum() would have zero gradient (softmax sums to 1).
    g_f, g_a = torch.randn_like(final), torch.randn_like(att)
    grads = torch.autograd.grad((final * g_f).sum() + (att * g_a).sum(), inputs, allow_unused=True)
    ref_grads = torch.autograd.grad(
        (ref_final * g_f).sum() + (ref_att * g_a).sum(), inputs, allow_unused=True
    )
    for got, want in zip(grads, ref_grads):
        if got is None or want is None:
            assert got is None and want is None or lens.sum() == 0
            continue
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("kind", EVOLUTION_KINDS)
def test_extractor_packed_states_feed_the_evolution_like_its_own_gather(kind: str) -> None:
    """DIEN hands the extractor's packed-order states to the evolution (no second gather): the same final
    states, attention and gradients, bit for bit, as the evolution gathering the jagged states itself."""
    torch.manual_seed(11)
    lens = torch.tensor([3, 0, 7, 1, 5, 7])
    layout = packed_layout(lens)
    ex = InterestExtractor(4, 5)
    ev = InterestEvolution(5, 6, 4, kind=kind, attention_hidden=[6, 3], attention_activation="dice")
    beh = torch.randn(int(lens.sum()), 4, requires_grad=True)
    cand = torch.randn(lens.numel(), 4)
    states, final, packed = ex.forward_with_packed(beh, lens, layout)
    assert packed is not None and torch.equal(packed[layout.unpack_index], states)
    torch.testing.assert_close(final, ex(beh, lens, layout)[1], rtol=0, atol=0)
    runs = []
    for hand_over in (True, False):
        s, _, p = ex.forward_with_packed(beh, lens, layout)
        out, att = ev(s, lens, cand, layout, packed_states=p if hand_over else None)
        g = torch.autograd.grad(
            (out * torch.arange(6.0)).sum() + att.sum(), [beh, *ex.parameters(), *ev.parameters()]
        )
        runs.append((out, att, g))
    for a, b in zip(runs[0][:2], runs[1][:2]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0][2], runs[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", EVOLUTION_KINDS)
def test_evolution_steps_touch_only_active_samples(kind: str) -> None:
    """Each step of the packed loop runs on its active samples only: N rows in all, over max(lengths) steps; a
    padded loop would run B rows per step. The single-node recurrence of ``forward`` gives the same."""
    torch.manual_seed(5)
    ev = InterestEvolution(4, 4, 4, kind=kind, attention_hidden=[6], attention_activation="prelu")
    lens = torch.tensor([1, 6, 0, 3, 6, 2])
    rows: list[int] = []
    step = ev.cell.step

    def counting_step(x_proj, h, att):
        assert x_proj.shape[0] == h.shape[0] == att.shape[0]
        rows.append(h.shape[0])
        return step(x_proj, h, att)

    ev.cell.step = counting_step
    states, cand = torch.randn(18, 4), torch.randn(6, 4)
    final_loop, att_loop = ev.forward_loop(states, lens, cand)
    assert rows == [5, 4, 3, 2, 2, 2]
    assert sum(rows) == int(lens.sum())
    final, att = ev(states, lens, cand)
    torch.testing.assert_close(final, final_loop)
    torch.testing.assert_close(att, att_loop)


def test_evolution_is_equivariant_to_batch_order_and_attention_sums_to_one() -> None:
    torch.manual_seed(6)
    ev = InterestEvolution(4, 3, 5, kind="augru", attention_hidden=[6, 3], attention_activation="dice").eval()
    lens = torch.tensor([2, 5, 0, 1, 5])
    states, cand = torch.randn(13, 4), torch.randn(5, 5)
    final, att = ev(states, lens, cand)
    perm = torch.tensor([4, 2, 0, 3, 1])
    offsets = _offsets(lens)
    rows = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in perm.tolist()])
    p_final, p_att = ev(states[rows], lens[perm], cand[perm])
    torch.testing.assert_close(p_final, final[perm])
    torch.testing.assert_close(p_att, att[rows])
    sums = torch.zeros(5).index_add(0, torch.repeat_interleave(torch.arange(5), lens), att)
    torch.testing.assert_close(sums, torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]))


def test_segment_softmax_is_per_segment_and_stable_for_large_scores() -> None:
    """Scores of 1000 overflow exp() unless each segment's max is subtracted first."""
    scores = torch.tensor([1000.0, 1001.0, -5.0, 3.0, 2000.0])
    segments = torch.tensor([0, 0, 2, 2, 3])  # segment 1 is empty
    out = segment_softmax(scores, segments, 4)
    want = torch.cat([torch.softmax(scores[:2], 0), torch.softmax(scores[2:4], 0), torch.ones(1)])
    torch.testing.assert_close(out, want)


def test_evolution_of_an_all_empty_batch_is_zeros() -> None:
    ev = InterestEvolution(4, 3, 4, attention_hidden=[6])
    final, att = ev(torch.zeros(0, 4), torch.tensor([0, 0, 0]), torch.randn(3, 4))
    assert final.shape == (3, 3) and torch.all(final == 0) and att.shape == (0,)


# ---------------------------------------------------------------------------------------------------------------
# Auxiliary loss
# ---------------------------------------------------------------------------------------------------------------


def _aux_per_sample(aux: AuxiliaryNextBehaviourLoss, states, beh, neg, lengths) -> torch.Tensor:
    """Independent reference: per sample, pairs (t, t+1) for t < L - 1, mean over all pairs of the batch."""

    def score(h, e):
        if aux.scorer == "dot":
            return (h * e).sum()
        return aux.mlp(torch.cat([h, e]).unsqueeze(0))[0, 0]

    terms, offsets = [], _offsets(lengths)
    for i, n in enumerate(lengths.tolist()):
        for t in range(n - 1):
            j = offsets[i] + t
            p, q = torch.sigmoid(score(states[j], beh[j + 1])), torch.sigmoid(score(states[j], neg[j + 1]))
            terms.append(-torch.log(p) - torch.log(1 - q))
    return torch.stack(terms).mean()


def _aux_inputs(lengths: torch.Tensor, h: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = int(lengths.sum())
    return [torch.randn(n, w, generator=g, requires_grad=True) for w in (h, d, d)]


@pytest.mark.parametrize("scorer", ["mlp", "dot"])
def test_auxiliary_loss_equals_per_sample_reference_forward_and_grad(scorer: str) -> None:
    torch.manual_seed(7)
    aux = AuxiliaryNextBehaviourLoss(4, 4, scorer=scorer, hidden=[8, 5])
    lens = torch.tensor([3, 0, 1, 5, 2])
    states, beh, neg = inputs = _aux_inputs(lens, 4, 4, 0)
    loss = aux(states, beh, neg, lens)
    ref = _aux_per_sample(aux, states, beh, neg, lens)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux.forward_reference(states, beh, neg, lens), ref, rtol=1e-5, atol=1e-6)
    params = list(aux.parameters())
    grads = torch.autograd.grad(loss, inputs + params)
    ref_grads = torch.autograd.grad(ref, inputs + params)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation,hidden", [("sigmoid", [7, 5]), ("dice", [7]), ("relu", [])])
def test_score_pairs_equals_scoring_each_half(activation: str, hidden: list[int]) -> None:
    """The split first layer (state side once, shared by positives and negatives) gives the logits and
    gradients of scoring ``[h, e]`` through the whole MLP; with Dice (batch statistics over all 2M rows,
    M > 32 so its fused path runs), over the same rows as one ``score`` call on both halves."""
    torch.manual_seed(9)
    aux = AuxiliaryNextBehaviourLoss(6, 4, hidden=hidden, activation=activation)
    g = torch.Generator().manual_seed(1)
    h, pos, neg = (
        torch.randn(40, w, generator=g, dtype=torch.float64, requires_grad=True) for w in (6, 4, 4)
    )
    aux = aux.double()
    weight = torch.randn(80, generator=g, dtype=torch.float64)
    got = torch.cat(aux.score_pairs(h, pos, neg))
    want = aux.score(torch.cat([h, h]), torch.cat([pos, neg]))
    torch.testing.assert_close(got, want)
    params = [h, pos, neg, *aux.parameters()]
    for a, b in zip(
        torch.autograd.grad((got * weight).sum(), params), torch.autograd.grad((want * weight).sum(), params)
    ):
        torch.testing.assert_close(a, b)


def test_auxiliary_loss_ignores_positions_that_belong_to_no_pair() -> None:
    """Unused: each sample's first behaviour and first negative (targets are steps t + 1), its last state
    (nothing follows it), and everything of a length-1 sample. Changing them must change neither the loss nor
    any gradient, and their own gradients are exactly zero."""
    torch.manual_seed(8)
    aux = AuxiliaryNextBehaviourLoss(5, 3, hidden=[6])
    lens = torch.tensor([4, 1, 0, 3])
    offsets = _offsets(lens)
    first = torch.tensor([offsets[i] for i in range(4) if lens[i] > 0])  # rows 0, 4, 5
    last = torch.tensor([offsets[i + 1] - 1 for i in range(4) if lens[i] > 0])  # rows 3, 4, 7

    def run(states, beh, neg):
        leaves = [x.detach().requires_grad_() for x in (states, beh, neg)]
        loss = aux(*leaves, lens)
        return loss, torch.autograd.grad(loss, leaves + list(aux.parameters()))

    states, beh, neg = (x.detach() for x in _aux_inputs(lens, 5, 3, 1))
    loss, grads = run(states, beh, neg)
    g_states, g_beh, g_neg = grads[:3]
    assert torch.all(g_beh[first] == 0) and torch.all(g_neg[first] == 0) and torch.all(g_states[last] == 0)
    assert g_neg[1:4].abs().min() > 0, "the used negatives must matter"

    states2, beh2, neg2 = states.clone(), beh.clone(), neg.clone()
    beh2[first] = torch.randn(len(first), 3) * 100
    neg2[first] = torch.randn(len(first), 3) * 100
    states2[last] = torch.randn(len(last), 5) * 100
    loss2, grads2 = run(states2, beh2, neg2)
    torch.testing.assert_close(loss2, loss)
    for got, want in zip(grads2, grads):
        torch.testing.assert_close(got, want)


def test_auxiliary_loss_differs_from_a_padded_mean_over_padded_steps() -> None:
    """Documents the bug of padded implementations: scoring every (t, t+1) of a padded [B, T] block and taking
    the mean over all B * (T - 1) positions (masked or not) mixes padding into the loss or dilutes it by the
    fill ratio. The masked mean over real pairs is what this module computes."""
    torch.manual_seed(9)
    aux = AuxiliaryNextBehaviourLoss(4, 4, scorer="dot")
    lens = torch.tensor([6, 2, 1, 3])
    # Scaled so that real pairs score far from 0: zero padding scores exactly 0, a loss of 2 log 2 per step.
    states, beh, neg = (3 * x.detach() for x in _aux_inputs(lens, 4, 4, 2))
    loss = aux(states, beh, neg, lens)

    t = int(lens.max())
    ps, pb, pn = (_pad(x, lens, t) for x in (states, beh, neg))
    h, pos, negs = ps[:, :-1].reshape(-1, 4), pb[:, 1:].reshape(-1, 4), pn[:, 1:].reshape(-1, 4)
    per_step = F.softplus(-aux.score(h, pos)) + F.softplus(aux.score(h, negs))  # [B * (T - 1)]
    real = (torch.arange(t - 1).unsqueeze(0) < (lens - 1).unsqueeze(1)).reshape(-1)
    unmasked_mean = per_step.mean()
    masked_diluted = (per_step * real).sum() / real.numel()
    masked_real_mean = (per_step * real).sum() / real.sum()
    torch.testing.assert_close(loss, masked_real_mean)
    assert (loss - unmasked_mean).abs() > 1e-2, "padded steps were averaged in"
    assert (loss - masked_diluted).abs() > 1e-2, "the mean was taken over padded positions"


@pytest.mark.parametrize("lengths", [[1, 0, 1], [0], []])
def test_auxiliary_loss_without_pairs_is_zero_with_a_graph(lengths: list[int]) -> None:
    aux = AuxiliaryNextBehaviourLoss(4, 3, hidden=[5])
    lens = torch.tensor(lengths, dtype=torch.long)
    inputs = _aux_inputs(lens, 4, 3, 3)
    loss = aux(*inputs, lens)
    assert loss.item() == 0.0 and loss.requires_grad
    grads = torch.autograd.grad(loss, inputs + list(aux.parameters()), allow_unused=True)
    for g in grads:
        assert g is None or (torch.isfinite(g).all() and torch.all(g == 0))


def test_dot_scorer_needs_equal_widths() -> None:
    with pytest.raises(ValueError, match="dot"):
        AuxiliaryNextBehaviourLoss(4, 3, scorer="dot")
