"""The jagged kernels of DIN's attention (ops/jagged_kernel.h) against their PyTorch references: values and
gradients on random jagged batches with empty and length-1 histories, unsorted segments, bf16 outputs and
weights, several threads."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from din_torchrec.modules.attention import segment_ids
from din_torchrec.ops import jagged, native

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="the native kernels did not build")


def _batch(lengths: list[int], d: int, seed: int, shuffle: bool = False):
    g = torch.Generator().manual_seed(seed)
    seg = segment_ids(torch.tensor(lengths))
    if shuffle:
        seg = seg[torch.randperm(seg.numel(), generator=g)]
    b = torch.randn(seg.numel(), d, generator=g).requires_grad_()
    c = torch.randn(len(lengths), d, generator=g).requires_grad_()
    w = torch.randn(seg.numel(), generator=g).requires_grad_()
    return b, c, w, seg


def _value_and_grads(fn, inputs, g):
    for t in inputs:
        t.grad = None
    out = fn()
    (out.float() * g).sum().backward()
    return out, [t.grad.clone() for t in inputs]


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=20),
    d=st.integers(1, 40),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kernels_equal_their_references(lengths, d, shuffle, seed) -> None:
    b, c, w, seg = _batch(lengths, d, seed, shuffle)
    n, bsz = seg.numel(), len(lengths)
    g = torch.randn(n, 2 * d)
    got = _value_and_grads(lambda: jagged._ProductFeatures.apply(b, c, seg, False), [b, c], g)
    want = _value_and_grads(lambda: jagged.product_features_reference(b, c, seg), [b, c], g)
    torch.testing.assert_close(got[0], want[0])
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    g = torch.randn(bsz, d)
    got = _value_and_grads(lambda: jagged._WeightedSegmentSum.apply(b, w, seg, bsz), [b, w], g)
    want = _value_and_grads(lambda: jagged.weighted_segment_sum_reference(b, w, seg, bsz), [b, w], g)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_bf16_features_are_autocasts_rounding_of_the_float32_ones() -> None:
    b, c, _, seg = _batch([5, 0, 1, 9, 3] * 50, 16, 1)
    g = torch.randn(seg.numel(), 32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = jagged.product_features(b, c, seg)
    assert x.dtype == torch.bfloat16
    assert torch.equal(x, jagged.product_features_reference(b, c, seg).bfloat16())
    (x * g).float().sum().backward()
    gb, gc = b.grad.clone(), c.grad.clone()
    b.grad = c.grad = None
    (jagged.product_features_reference(b, c, seg) * g.float()).sum().backward()
    torch.testing.assert_close(gb, b.grad)
    torch.testing.assert_close(gc, c.grad, rtol=1e-5, atol=1e-5)


def test_a_bf16_candidate_gives_the_reference_values_and_a_bf16_gradient() -> None:
    b, c, _, seg = _batch([4, 0, 1, 6] * 30, 12, 5)
    cb = c.detach().bfloat16().requires_grad_()
    x = jagged.product_features(b, cb, seg)
    assert x.grad_fn is not None and x.dtype == torch.float32
    torch.testing.assert_close(x, jagged.product_features_reference(b, cb, seg))
    g = torch.randn_like(x)
    (x * g).sum().backward()
    # The kernel sums each sample's rows in float32 and rounds once (the reference's bf16 index_add rounds at
    # every row): compare with the float32 gradient, to bf16 precision.
    c32 = cb.detach().float().requires_grad_()
    (jagged.product_features_reference(b, c32, seg) * g).sum().backward()
    assert cb.grad.dtype == torch.bfloat16
    torch.testing.assert_close(cb.grad.float(), c32.grad, rtol=8e-3, atol=1e-6)


def test_bf16_weights_pool_in_float32_and_get_a_bf16_gradient() -> None:
    b, _, w, seg = _batch([7, 0, 2, 1] * 40, 8, 2)
    wb = w.detach().bfloat16().requires_grad_()
    p = jagged.weighted_segment_sum(b, wb, seg, 160)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, jagged.weighted_segment_sum_reference(b, wb.float(), seg, 160))
    p.sum().backward()
    assert wb.grad.dtype == torch.bfloat16


def test_several_threads_give_the_single_thread_result() -> None:
    b, c, w, seg = _batch([30] * 400, 24, 3)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append(
                (
                    jagged._WeightedSegmentSum.apply(b, w, seg, 400).detach(),
                    torch.autograd.grad(jagged._ProductFeatures.apply(b, c, seg, False).sum(), [c])[0],
                )
            )
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_unsupported_inputs_take_the_reference() -> None:
    b, c, w, seg = _batch([3, 2], 4, 4)
    x = jagged.product_features(b.double(), c.double(), seg)
    assert x.dtype == torch.float64 and x.grad_fn.name() == "CatBackward0"
    p = jagged.weighted_segment_sum(b.double(), w.double(), seg, 2)
    assert p.dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------------
# The first layer with per-sample weights (ops/lau_kernel.h)
# ---------------------------------------------------------------------------------------------------------------


def _first_layer_inputs(lengths: list[int], d: int, h: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    seg = segment_ids(torch.tensor(lengths))
    n, bsz = seg.numel(), len(lengths)
    shapes = [(n, d), (bsz, d), (h, d), (h, d), (bsz, h)]
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes], seg


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=20).filter(lambda ls: sum(ls) > 0),
    d=st.integers(1, 40),
    h=st.integers(1, 90),
    seed=st.integers(0, 2**16),
)
def test_first_layer_kernel_equals_the_float64_matmul(lengths, d, h, seed) -> None:
    """Values and all five gradients against the [b, b * c] matmul in float64 (empty and length-1 histories,
    odd widths)."""
    inputs, seg = _first_layer_inputs(lengths, d, h, seed)
    g = torch.randn(seg.numel(), h, generator=torch.Generator().manual_seed(seed + 1))
    got = _value_and_grads(lambda: jagged._FirstLayer.apply(*inputs[:2], seg, *inputs[2:]), inputs, g)
    wide = [t.detach().double().requires_grad_() for t in inputs]
    want = _value_and_grads(lambda: jagged.first_layer_reference(*wide[:2], seg, *wide[2:]), wide, g.double())
    scale = float(want[0].detach().abs().max()) + 1.0
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5 * scale)
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-5 * (float(e.abs().max()) + 1.0))


def test_first_layer_takes_the_kernel_only_with_enough_rows_per_sample() -> None:
    many, seg = _first_layer_inputs([9, 0, 12, 7], 8, 10, 1)  # 28 rows, 4 samples: 7 per sample
    assert type(jagged.first_layer(*many[:2], seg, *many[2:]).grad_fn).__name__ == "_FirstLayerBackward"
    few, seg = _first_layer_inputs([3, 0, 5, 1, 4], 8, 10, 2)  # 2.6 per sample: the matmul
    assert type(jagged.first_layer(*few[:2], seg, *few[2:]).grad_fn).__name__ != "_FirstLayerBackward"


def test_first_layer_takes_the_matmul_for_unsorted_rows_bf16_and_float64() -> None:
    inputs, seg = _first_layer_inputs([13, 0, 15, 1, 14], 8, 10, 2)
    perm = torch.randperm(seg.numel(), generator=torch.Generator().manual_seed(0))
    z = jagged.first_layer(inputs[0][perm], inputs[1], seg[perm], *inputs[2:])
    assert type(z.grad_fn).__name__ != "_FirstLayerBackward"
    torch.testing.assert_close(z, jagged.first_layer(*inputs[:2], seg, *inputs[2:])[perm])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not jagged.first_layer_native(inputs[0], inputs[1], inputs[4])
    wide, seg = _first_layer_inputs([13, 0, 15], 8, 10, 3, torch.float64)
    assert type(jagged.first_layer(*wide[:2], seg, *wide[2:]).grad_fn).__name__ != "_FirstLayerBackward"


def test_first_layer_under_bf16_autocast_is_the_linear_kernel_with_added_rows() -> None:
    # Under bf16 the [N, 2D] product runs through the BRGEMM linear kernel with k[seg] added before its one
    # rounding: autocast's padded addmm (first_layer_reference) to a bf16 step, values and every gradient.
    inputs, seg = _first_layer_inputs([7, 0, 1, 30] * 80, 16, 24, 5)
    g = torch.randn(seg.numel(), 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _value_and_grads(lambda: jagged.first_layer(*inputs[:2], seg, *inputs[2:]), inputs, g)
        assert (
            type(jagged.first_layer(*inputs[:2], seg, *inputs[2:]).grad_fn).__name__
            == "_NativeLinearBackward"
        )
        want = _value_and_grads(
            lambda: jagged.first_layer_reference(*inputs[:2], seg, *inputs[2:]), inputs, g
        )
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    scale = float(want[0].detach().abs().max())
    torch.testing.assert_close(got[0].double(), want[0].double(), rtol=2**-7, atol=2**-7 * scale)
    for a, e in zip(got[1], want[1]):
        torch.testing.assert_close(a.double(), e.double(), rtol=2**-6, atol=2**-6 * float(e.abs().max()))


def test_first_layer_kernel_is_the_same_with_two_threads() -> None:
    inputs, seg = _first_layer_inputs([7, 0, 1, 30] * 300, 16, 24, 4)
    g = torch.randn(seg.numel(), 24)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _value_and_grads(lambda: jagged._FirstLayer.apply(*inputs[:2], seg, *inputs[2:]), inputs, g)
        torch.set_num_threads(2)
        two = _value_and_grads(lambda: jagged._FirstLayer.apply(*inputs[:2], seg, *inputs[2:]), inputs, g)
    finally:
        torch.set_num_threads(before)
    # Rows are independent: the same values bit for bit. The weight gradients are two partial sums over
    # 4,800 rows with two threads: equal up to float32 reassociation.
    torch.testing.assert_close(one[0], two[0], rtol=0, atol=0)
    for a, e in zip(one[1], two[1]):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * (float(e.abs().max()) + 1.0))
