"""The fused Dice and the jagged DIN attention built on it, against their plain references
(``Dice.forward_reference``, ``TargetAttentionPooling.forward_padded``, ``scores_reference``), forward,
gradients and running estimates, on random jagged inputs with empty and length-1 histories. The whole module
runs twice: Dice through the native kernel (ops/fused_dice.py, ops/native.py) and through its ATen path (batch-norm kernel
+ DiceGate), the fallback without a C++ compiler."""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from din_torchrec.modules.activations import Dice, DiceGate
from din_torchrec.modules.attention import LocalActivationUnit, TargetAttentionPooling, segment_ids
from din_torchrec.ops import native


@pytest.fixture(scope="module", params=["kernel", "aten"], autouse=True)
def dice_path(request):
    """Module-scoped (hypothesis refuses function-scoped fixtures): every test once per Dice path."""
    if request.param == "kernel" and native.kernels() is None:
        pytest.skip("the native kernels did not build")
    native.set_enabled(request.param == "kernel")
    yield request.param
    native.set_enabled(True)


def _pad(values: torch.Tensor, lengths: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    out = values.new_zeros(lengths.numel(), t, values.shape[-1])
    out[mask] = values
    return out, mask


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same_backward(att, att_ref, pooled, ref_pooled, behaviours, candidates) -> None:
    """Backward of a random weighting of both pooled outputs: the jagged behaviour gradient equals the padded
    one at the real positions; candidate and parameter gradients and Dice's running estimates agree."""
    (beh, padded, mask), (cand, cand_ref) = behaviours, candidates
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


def test_fused_dice_equals_the_formula_values_running_stats_and_grads() -> None:
    torch.manual_seed(0)
    ref = Dice(12, eps=1e-8, momentum=0.1)
    torch.nn.init.uniform_(ref.alpha, -1, 1)
    fast = copy.deepcopy(ref)
    x = (torch.randn(300, 12) * 3 + 2).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    w = torch.randn(300, 12)
    (ref.forward_reference(x) * w).sum().backward()
    (fast(x2) * w).sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.alpha.grad, ref.alpha.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.running_mean, ref.running_mean)
    torch.testing.assert_close(fast.running_var, ref.running_var, rtol=1e-4, atol=1e-6)
    fast.eval()
    ref.eval()
    torch.testing.assert_close(fast(x2), ref.forward_reference(x), rtol=1e-5, atol=1e-5)


def test_fused_dice_on_3d_input_normalises_over_every_leading_dim() -> None:
    torch.manual_seed(2)
    d = Dice(5)
    x = torch.randn(4, 9, 5) * 2 + 1
    torch.testing.assert_close(d(x), copy.deepcopy(d).forward_reference(x), rtol=1e-5, atol=1e-5)


def test_dice_gate_backward_passes_gradcheck() -> None:
    torch.manual_seed(1)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    alpha = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(DiceGate.apply, (x, z, alpha))


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=8),
    normalization=st.sampled_from(["none", "softmax"]),
    activation=st.sampled_from(["dice", "prelu"]),
    seed=st.integers(0, 2**16),
)
def test_attention_equals_padded_reference_forward_and_grad(lengths, normalization, activation, seed) -> None:
    torch.manual_seed(seed)
    lengths_t = torch.tensor(lengths + [0, 1])  # always an empty and a length-1 history
    d = 8
    # float64: Dice over a handful of rows divides by a near-zero std, which amplifies float32 rounding (the
    # two paths sum the first layer in different orders) past any sensible tolerance.
    att = TargetAttentionPooling(d, [16, 8], activation, normalization).double()
    att_ref = copy.deepcopy(att)
    n = int(lengths_t.sum())
    beh = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    cand = torch.randn(lengths_t.numel(), d, dtype=torch.float64, requires_grad=True)
    padded, mask = _pad(beh.detach(), lengths_t, max(lengths + [1]))
    padded.requires_grad_()
    cand_ref = cand.detach().clone().requires_grad_()
    pooled, weights = att(beh, lengths_t, cand)
    ref_pooled, ref_weights = att_ref.forward_padded(padded, mask, cand_ref)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights, ref_weights[mask], rtol=1e-4, atol=1e-5)
    assert torch.all(pooled[-2] == 0), "an empty history pools to zeros"
    _assert_same_backward(att, att_ref, pooled, ref_pooled, (beh, padded, mask), (cand, cand_ref))


@pytest.mark.parametrize("normalization", ["none", "softmax"])
def test_attention_equals_padded_reference_on_a_batch_large_enough_for_the_batch_norm_kernel(
    normalization,
) -> None:
    torch.manual_seed(5)
    lengths = torch.cat([torch.tensor([0, 1, 0, 1]), torch.randint(0, 30, (40,))])
    d = 8
    att = TargetAttentionPooling(d, [16, 8], "dice", normalization)
    att_ref = copy.deepcopy(att)
    beh = torch.randn(int(lengths.sum()), d, requires_grad=True)
    cand = torch.randn(lengths.numel(), d, requires_grad=True)
    padded, mask = _pad(beh.detach(), lengths, int(lengths.max()))
    padded.requires_grad_()
    cand_r = cand.detach().clone().requires_grad_()
    assert int(lengths.sum()) >= 32, "the fused batch-norm path needs at least 32 rows"
    pooled, weights = att(beh, lengths, cand)
    ref_pooled, ref_weights = att_ref.forward_padded(padded, mask, cand_r)
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weights, ref_weights[mask], rtol=1e-4, atol=1e-5)
    _assert_same_backward(att, att_ref, pooled, ref_pooled, (beh, padded, mask), (cand, cand_r))


@pytest.mark.parametrize("activation", ["dice", "prelu", "relu"])
def test_jagged_scores_equal_scores_reference(activation: str) -> None:
    torch.manual_seed(3)
    unit = LocalActivationUnit(6, [10, 5], activation)
    ref_unit = copy.deepcopy(unit)
    lengths = torch.tensor([3, 0, 1, 5, 2])
    seg = segment_ids(lengths)
    beh = torch.randn(int(lengths.sum()), 6, requires_grad=True)
    cand = torch.randn(5, 6, requires_grad=True)
    beh_r = beh.detach().clone().requires_grad_()
    cand_r = cand.detach().clone().requires_grad_()
    s = unit.scores_jagged(beh, cand, seg)
    r = ref_unit.scores_reference(beh_r, cand_r.index_select(0, seg))
    torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-6)
    s.sum().backward()
    r.sum().backward()
    torch.testing.assert_close(beh.grad, beh_r.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cand.grad, cand_r.grad, rtol=1e-4, atol=1e-5)


def test_attention_in_eval_mode_uses_running_estimates() -> None:
    torch.manual_seed(4)
    att = TargetAttentionPooling(4, [6], "dice")
    lengths = torch.tensor([20, 30])
    beh, cand = torch.randn(50, 4), torch.randn(2, 4)
    att(beh, lengths, cand)  # moves the running estimates (fused path: 50 rows)
    att.eval()
    dice = att.unit.first_activation
    assert isinstance(dice, Dice) and float(dice.running_mean.abs().sum()) > 0
    padded, mask = _pad(beh, lengths, 30)
    torch.testing.assert_close(att(beh, lengths, cand)[0], att.forward_padded(padded, mask, cand)[0])


def test_row_buckets_under_bf16_autocast_change_nothing_but_the_matmul_shapes(monkeypatch) -> None:
    """Padding matmul rows to a bucket (bf16 on the CPU) gives the unpadded values and gradients: the padded
    rows never reach Dice's statistics or the output."""
    import din_torchrec.modules.mlp as mlp
    import din_torchrec.ops.jagged as jagged
    import din_torchrec.ops.linear as linear_module

    # The padded path is F.linear / addmm's (where the BRGEMM linear kernel does not run: no compiler, a GPU).
    monkeypatch.setattr(linear_module, "native_linear_dtype", lambda *a: None)
    monkeypatch.setattr(jagged, "native_linear_dtype", lambda *a: None)
    torch.manual_seed(7)
    monkeypatch.setattr(mlp, "ROW_BUCKET", 64)
    lengths = torch.randint(0, 12, (30,))
    d = 8
    att = TargetAttentionPooling(d, [16, 8], "dice")
    ref = copy.deepcopy(att)
    beh = torch.randn(int(lengths.sum()), d, requires_grad=True)
    beh_r = beh.detach().clone().requires_grad_()
    cand = torch.randn(30, d)
    assert int(lengths.sum()) % 64 != 0 and int(lengths.sum()) > 64
    shapes: list[int] = []
    real_mm = torch.addmm

    def spy(c, a, b):
        if a.shape[0] != 30:  # the candidate side (B rows) is not jagged
            shapes.append(a.shape[0])
        return real_mm(c, a, b)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        monkeypatch.setattr(torch, "addmm", spy)
        out, w = att(beh, lengths, cand)
        monkeypatch.setattr(torch, "addmm", real_mm)
        monkeypatch.setattr(mlp, "ROW_BUCKET", 1)  # the same code path, without padding (pad is 0)
        out_r, w_r = ref(beh_r, lengths, cand)
    assert shapes and all(s % 64 == 0 for s in shapes), shapes
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(w, w_r)
    g = torch.randn_like(out)
    (out.float() * g).sum().backward()
    (out_r.float() * g).sum().backward()
    torch.testing.assert_close(beh.grad, beh_r.grad)
    for (name, p), p_r in zip(att.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_r.grad, msg=name)
    for (name, b), b_r in zip(att.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, b_r, msg=name)


def test_split_first_layer_under_bf16_autocast_is_the_float32_formula_to_bf16_precision() -> None:
    """Under bf16 autocast the unit's split first layer (candidate side through the linear kernel where it
    runs, behaviour side through the BRGEMM or oneDNN product) gives the float32 formula's scores and gradients
    to bf16 precision: no term dropped or counted twice by the split."""
    torch.manual_seed(12)
    lengths = torch.randint(0, 9, (40,))
    lengths[:2] = torch.tensor([0, 1])
    d = 16
    unit = LocalActivationUnit(d, [24, 12], "prelu")
    beh = torch.randn(int(lengths.sum()), d, requires_grad=True)
    cand = torch.randn(40, d, requires_grad=True)
    seg = segment_ids(lengths)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = unit.scores_jagged(beh, cand, seg)
    want = unit.scores_reference(beh, cand.index_select(0, seg))
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad((got.float() * g).sum(), [beh, cand, *unit.parameters()])
    want_grads = torch.autograd.grad((want * g).sum(), [beh, cand, *unit.parameters()])
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a.float(), e, rtol=0.05, atol=0.05 * (1 + float(e.abs().max())))
