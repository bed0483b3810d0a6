"""The C++ packed recurrence (ops/recurrence_kernel.h, ``NativePackedRecurrence``) against the autograd loop of
each cell's equations evaluated in float64, and against the PyTorch ``PackedRecurrence``: values and the
gradients of every input, on random jagged batches with empty and length-1 histories."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from din_torchrec.modules.interest_evolution import packed_layout
from din_torchrec.modules.recurrence import (
    MODES,
    NativePackedRecurrence,
    PackedRecurrence,
    _recurrence_function,
    packed_recurrence,
)
from din_torchrec.ops import native
from tests.modules.test_recurrence import _inputs, _loop

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="the native kernels did not build")


def _grads(fn, inputs, g):
    out = fn(*inputs)
    grads = torch.autograd.grad((out * g).sum(), [t for t in inputs if t is not None])
    return out, grads


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=12),
    mode=st.sampled_from(MODES),
    hidden=st.sampled_from([1, 3, 16, 19, 32]),
    seed=st.integers(0, 2**16),
)
def test_native_recurrence_equals_the_float64_loop(lengths, mode, hidden, seed) -> None:
    torch.manual_seed(seed)
    if sum(lengths) == 0:
        lengths[0] = 1
    steps = packed_layout(torch.tensor(lengths)).steps
    x, att, w, b = _inputs(mode, sum(lengths), hidden, dtype=torch.float32)
    # nn.GRU's scale of weights: with N(0, 1) weights at hidden 32 a few steps are already chaotic and
    # float32 rounding differences between any two correct implementations grow past the tolerance.
    w = (w.detach() / hidden**0.5).requires_grad_()
    inputs = (x, att, w, b)
    g = torch.randn(sum(lengths), hidden)

    def native_fn(x, att, w, b):
        return NativePackedRecurrence.apply(x, att, w, b, steps, mode)

    def loop64(x, att, w, b):
        return _loop(
            x.double(),
            None if att is None else att.double(),
            w.double(),
            None if b is None else b.double(),
            steps,
            mode,
            hidden,
        )

    out, grads = _grads(native_fn, inputs, g)
    ref, ref_grads = _grads(loop64, inputs, g.double())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        scale = 1 + float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("mode", MODES)
def test_native_recurrence_matches_the_pytorch_function_on_a_dien_sized_batch(mode: str) -> None:
    torch.manual_seed(5)
    lengths = torch.randint(0, 51, (256,))
    lengths[:2] = torch.tensor([0, 1])
    steps = packed_layout(lengths).steps
    x, att, w, b = _inputs(mode, int(lengths.sum()), 32, dtype=torch.float32)
    # nn.GRU's scale of weights: N(0, 1) ones make 50 steps chaotic, where float32 rounding differences grow.
    w = (w.detach() / 32**0.5).requires_grad_()
    g = torch.randn(int(lengths.sum()), 32)
    out, grads = _grads(lambda *a: NativePackedRecurrence.apply(*a, steps, mode), (x, att, w, b), g)
    ref, ref_grads = _grads(lambda *a: PackedRecurrence.apply(*a, steps, mode), (x, att, w, b), g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * (1 + float(want.abs().max())))


def test_packed_recurrence_takes_the_native_path_for_float32_cpu_tensors_only() -> None:
    assert _recurrence_function(torch.randn(4, 6)) is NativePackedRecurrence
    assert _recurrence_function(torch.randn(4, 6, dtype=torch.float64)) is PackedRecurrence
    # under bf16 autocast the inputs are cast to float32 first: native again
    steps = packed_layout(torch.tensor([3, 1])).steps
    x, att, w, _ = _inputs("augru", 4, 2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_recurrence(x, att, w, None, steps, "augru")
    assert out.dtype == torch.float32 and out.grad_fn.name().startswith("NativePackedRecurrence")
