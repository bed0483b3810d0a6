"""The new fast paths against their references, forward and gradients, on random jagged inputs with empty
and length-1 histories: fused DIN attention (modules/fast_attention.py) and the bucketed GRU
(modules/fast_gru.py)."""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from din_torchrec.modules.activations import Dice
from din_torchrec.modules.attention import LocalActivationUnit, TargetAttentionPooling, segment_ids
from din_torchrec.modules.fast_attention import _DiceGate, dice, fast_scores, fast_target_attention
from din_torchrec.modules.fast_gru import _bucket_bounds, bucketed_gru
from din_torchrec.modules.interest_evolution import InterestExtractor


def _pad(values: torch.Tensor, lengths: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    out = values.new_zeros(lengths.numel(), t, values.shape[-1])
    out[mask] = values
    return out, mask


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_dice_equals_the_module_values_running_stats_and_grads() -> None:
    torch.manual_seed(0)
    ref = Dice(12, eps=1e-8, momentum=0.1)
    torch.nn.init.uniform_(ref.alpha, -1, 1)
    fast = copy.deepcopy(ref)
    x = (torch.randn(300, 12) * 3 + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w = torch.randn(300, 12)
    (ref(x) * w).sum().backward()
    (dice(fast, x2) * w).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.alpha.grad, ref.alpha.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.running_mean, ref.running_mean)
    torch.testing.assert_close(fast.running_var, ref.running_var, rtol=1e-4, atol=1e-6)
    fast.eval()
    ref.eval()
    torch.testing.assert_close(dice(fast, x2), ref(x), rtol=1e-5, atol=1e-5)


def test_dice_gate_backward_passes_gradcheck() -> None:
    torch.manual_seed(1)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_DiceGate.apply, (x, z, alpha))


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=8),
    normalization=st.sampled_from(["none", "softmax"]),
    activation=st.sampled_from(["dice", "prelu"]),
    seed=st.integers(0, 2**16),
)
def test_fused_attention_equals_padded_reference_forward_and_grad(
    lengths, normalization, activation, seed
) -> None:
    torch.manual_seed(seed)
    lengths_t = torch.tensor(lengths + [0, 1])  # always an empty and a length-1 history
    d = 8
    att = TargetAttentionPooling(d, [16, 8], activation, normalization)
    att_ref = copy.deepcopy(att)
    n = int(lengths_t.sum())
    beh = torch.randn(n, d, requires_grad=True)
    cand = torch.randn(lengths_t.numel(), d, requires_grad=True)
    padded, mask = _pad(beh.detach(), lengths_t, max(lengths + [1]))
    padded.requires_grad_()
    cand_ref = cand.detach().clone().requires_grad_()
    pooled, weights = fast_target_attention(att, beh, lengths_t, cand)
    ref_pooled, ref_weights = att_ref.forward_padded(padded, mask, cand_ref)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights, ref_weights[mask], rtol=1e-4, atol=1e-5)
    assert torch.all(pooled[-2] == 0), "an empty history pools to zeros"
    g = torch.randn_like(pooled)
    (pooled * g).sum().backward()
    (ref_pooled * g).sum().backward()
    torch.testing.assert_close(beh.grad, padded.grad[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cand.grad, cand_ref.grad, rtol=1e-4, atol=1e-5)
    ref_grads = _grads(att_ref)
    for name, grad in _grads(att).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-4, msg=name)
    for (name, buf), ref_buf in zip(att.named_buffers(), att_ref.buffers()):
        torch.testing.assert_close(buf, ref_buf, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_fused_attention_equals_reference_on_a_batch_large_enough_for_the_batch_norm_kernel(
    normalization,
) -> None:
    torch.manual_seed(5)
    lengths = torch.cat([torch.tensor([0, 1, 0, 1]), torch.randint(0, 30, (40,))])
    d = 8
    att = TargetAttentionPooling(d, [16, 8], "dice", normalization)
    att_ref = copy.deepcopy(att)
    beh = torch.randn(int(lengths.sum()), d, requires_grad=True)
    cand = torch.randn(lengths.numel(), d, requires_grad=True)
    beh_r = beh.detach().clone().requires_grad_()
    cand_r = cand.detach().clone().requires_grad_()
    pooled, weights = fast_target_attention(att, beh, lengths, cand)
    ref_pooled, ref_weights = att_ref(beh_r, lengths, cand_r)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(pooled)
    (pooled * g).sum().backward()
    (ref_pooled * g).sum().backward()
    torch.testing.assert_close(beh.grad, beh_r.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cand.grad, cand_r.grad, rtol=1e-4, atol=1e-5)
    ref_grads = _grads(att_ref)
    for name, grad in _grads(att).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-4, msg=name)
    for (name, buf), ref_buf in zip(att.named_buffers(), att_ref.buffers()):
        torch.testing.assert_close(buf, ref_buf, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("activation", ["dice", "prelu", "relu"])
def test_fast_scores_equal_scores_reference(activation: str) -> None:
    torch.manual_seed(3)
    unit = LocalActivationUnit(6, [10, 5], activation)
    ref_unit = copy.deepcopy(unit)
    lengths = torch.tensor([3, 0, 1, 5, 2])
    seg = segment_ids(lengths)
    beh = torch.randn(int(lengths.sum()), 6, requires_grad=True)
    cand = torch.randn(5, 6, requires_grad=True)
    beh_r = beh.detach().clone().requires_grad_()
    cand_r = cand.detach().clone().requires_grad_()
    s = fast_scores(unit, beh, cand, seg)
    r = ref_unit.scores_reference(beh_r, cand_r.index_select(0, seg))
    torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-6)
    s.sum().backward()
    r.sum().backward()
    torch.testing.assert_close(beh.grad, beh_r.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cand.grad, cand_r.grad, rtol=1e-4, atol=1e-5)


def test_fused_attention_in_eval_mode_uses_running_estimates() -> None:
    torch.manual_seed(4)
    att = TargetAttentionPooling(4, [6], "dice")
    lengths = torch.tensor([2, 3])
    beh, cand = torch.randn(5, 4), torch.randn(2, 4)
    att(beh, lengths, cand)  # moves the running estimates
    att.eval()
    torch.testing.assert_close(fast_target_attention(att, beh, lengths, cand)[0], att(beh, lengths, cand)[0])


def test_bucket_bounds_cover_every_non_empty_sample_once() -> None:
    lengths = [9, 9, 7, 5, 3, 2, 1, 1, 0, 0]
    for buckets in (1, 2, 3, 4, 20):
        bounds = _bucket_bounds(lengths, buckets)
        covered = [i for lo, hi in bounds for i in range(lo, hi)]
        assert covered == list(range(8)), (buckets, bounds)
        assert len(bounds) <= buckets
    assert _bucket_bounds([0, 0], 3) == []


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=10),
    buckets=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_bucketed_gru_equals_the_packed_extractor_forward_and_grad(lengths, buckets, seed) -> None:
    torch.manual_seed(seed)
    lengths_t = torch.tensor(lengths + [0, 1])
    ex = InterestExtractor(5, 4)
    n = int(lengths_t.sum())
    beh = torch.randn(n, 5, requires_grad=True)
    beh_r = beh.detach().clone().requires_grad_()
    states, final = bucketed_gru(ex.gru, beh, lengths_t, buckets)
    ref_states, ref_final = ex(beh_r, lengths_t)
    torch.testing.assert_close(states, ref_states, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(final, ref_final, rtol=1e-5, atol=1e-6)
    assert torch.all(final[-2] == 0)
    grads = {}
    for name, (s, f, leaf) in {"fast": (states, final, beh), "ref": (ref_states, ref_final, beh_r)}.items():
        ex.zero_grad()
        g = torch.Generator().manual_seed(1)
        (
            (s * torch.randn(s.shape, generator=g)).sum() + (f * torch.randn(f.shape, generator=g)).sum()
        ).backward()
        grads[name] = (leaf.grad.clone(), {k: p.grad.clone() for k, p in ex.named_parameters()})
    torch.testing.assert_close(grads["fast"][0], grads["ref"][0], rtol=1e-4, atol=1e-5)
    for k, v in grads["fast"][1].items():
        torch.testing.assert_close(v, grads["ref"][1][k], rtol=1e-4, atol=1e-5, msg=k)


def test_bucketed_gru_on_an_all_empty_batch_is_zeros() -> None:
    ex = InterestExtractor(3, 2)
    states, final = bucketed_gru(ex.gru, torch.zeros(0, 3), torch.zeros(4, dtype=torch.long))
    assert states.shape == (0, 2) and torch.all(final == 0) and final.shape == (4, 2)
