"""The CPU linear layer through oneDNN's BRGEMM (din_torchrec.ops.linear, ``linear_kernel.h``), float32 and bf16
(autocast), against ``F.linear`` in float64: output and every gradient, on shapes around the kernel's row blocks
(128 rows) -- empty, one row, a block and one row over -- and odd widths (bf16 pairs rows of its operands),
with and without bias (and bf16's added rows), for 1, 2 and 3 threads; where it must not run (float16
autocast, float64) it is ``F.linear`` itself."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from din_torchrec.modules.mlp import MLP
from din_torchrec.ops import linear as linear_module
from din_torchrec.ops.linear import linear, native_linear_usable
from din_torchrec.ops.native import kernels as native_kernels

pytestmark = pytest.mark.skipif(native_kernels() is None, reason="native kernels unavailable (no compiler)")


def _grads(fn, x, w, b, g):
    y = fn(x, w, b)
    return [y.detach()] + list(torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], g))


def _case(m: int, i: int, o: int, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, i, generator=gen, requires_grad=True)
    w = torch.randn(o, i, generator=gen, requires_grad=True)
    b = torch.randn(o, generator=gen, requires_grad=True) if bias else None
    g = torch.randn(m, o, generator=gen)
    return x, w, b, g


# Shapes around the kernel's 128-row blocks, odd and even widths, with and without bias, 1-3 threads.
_CASES = dict(
    m=st.sampled_from([0, 1, 2, 127, 128, 129, 300]),
    i=st.integers(1, 70),
    o=st.integers(1, 60),
    bias=st.booleans(),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 10_000),
)


@settings(max_examples=40, deadline=None)
@given(**_CASES)
def test_native_linear_equals_float64_reference(m, i, o, bias, threads, seed) -> None:
    x, w, b, g = _case(m, i, o, bias, seed)
    assert native_linear_usable(x, w)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _grads(linear, x, w, b, g)
    finally:
        torch.set_num_threads(before)
    as64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    want = _grads(F.linear, *as64, g.double())
    assert len(got) == len(want)
    for a, e in zip(got, want):
        assert a.dtype == torch.float32
        # float32 sums of <= 300 products of unit normals: absolute error ~1e-5 at most
        torch.testing.assert_close(a.double(), e, rtol=1e-5, atol=1e-4)


def test_rows_and_input_gradients_do_not_depend_on_the_thread_count() -> None:
    # y's and dx's rows are one micro-kernel call each; dW sums per thread, so it is only close.
    x, w, b, g = _case(1000, 40, 24, True, 0)
    runs = []
    before = torch.get_num_threads()
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        runs.append(_grads(linear, x, w, b, g))
    torch.set_num_threads(before)
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])
        torch.testing.assert_close(runs[0][2], other[2], rtol=1e-5, atol=1e-5)


def test_only_the_requested_gradients_are_computed() -> None:
    x, w, b, g = _case(200, 16, 8, True, 1)
    frozen_w = w.detach()
    dx, db = torch.autograd.grad(linear(x, frozen_w, b), [x, b], g)
    torch.testing.assert_close(dx, g @ frozen_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, g.sum(0), rtol=1e-5, atol=1e-5)
    (dw,) = torch.autograd.grad(linear(x.detach(), w), [w], g)
    torch.testing.assert_close(dw, g.t() @ x.detach(), rtol=1e-4, atol=1e-4)


def test_falls_back_to_f_linear_where_the_kernel_does_not_apply(monkeypatch) -> None:
    calls = []
    real = linear_module._NativeLinear.apply
    monkeypatch.setattr(linear_module._NativeLinear, "apply", lambda *a: calls.append(1) or real(*a))
    x, w, b, _ = _case(50, 8, 4, True, 2)
    with torch.autocast("cpu", dtype=torch.float16):
        y = linear(x, w, b)
    assert y.dtype == torch.float16 and not calls  # float16 autocast: F.linear
    y = linear(x.double(), w.double(), b.double())
    assert y.dtype == torch.float64 and not calls
    y = linear(x.bfloat16(), w.bfloat16(), b.bfloat16())
    assert y.dtype == torch.bfloat16 and not calls  # a bf16 model outside autocast: F.linear
    linear(x, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w, b)
    assert y.dtype == torch.bfloat16 and calls == [1, 1]


def test_mlp_in_float32_runs_the_kernel_and_matches_its_reference(monkeypatch) -> None:
    # The MLP's layers go through the kernel (a spy counts the calls) and still equal the plain PyTorch layers.
    calls = []
    real = linear_module._NativeLinear.apply
    monkeypatch.setattr(linear_module._NativeLinear, "apply", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    mlp = MLP(12, [20, 10], activation="relu", out_features=1)
    x = torch.randn(300, 12, requires_grad=True)
    y = mlp(x)
    assert len(calls) == 3
    ref = mlp.layers(x)  # nn.Sequential: every nn.Linear through F.linear
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gy, gref = (
        torch.autograd.grad(y.sum(), [x, *mlp.parameters()]),
        torch.autograd.grad(ref.sum(), [x, *mlp.parameters()]),
    )
    for a, e in zip(gy, gref):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)


def _bf16(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().bfloat16().double().requires_grad_()


@settings(max_examples=40, deadline=None)
@given(
    add=st.sampled_from([None, torch.float32, torch.bfloat16]),
    indexed=st.booleans(),
    rows=st.sampled_from(["all", "permutation", "subset"]),
    x_bf16=st.booleans(),
    **_CASES,
)
def test_bf16_native_linear_equals_float64_reference_on_its_operands(
    m, i, o, bias, add, indexed, rows, x_bf16, threads, seed
) -> None:
    # What autocast's F.linear computes: bf16 operands (x, W; the gradient arriving in bf16), exact products
    # summed in float32, the output and dx rounded to bf16 once -- here with the bias (float32) and the added
    # rows inside that one rounding -- dW and db summed in float32 and returned in float32. Indexed: the
    # added rows are add[index] of a [S, O] add (unsorted, repeated and unused rows), its gradient the
    # index_add of the output gradient. With rows, the product reads x[rows] (a permutation, or a subset of a
    # larger x: the other rows' gradient is zero); x float32 (rounded inside the kernel; dx comes back in float32,
    # unrounded) or bf16.
    x, w, b, g = _case(m, i, o, bias, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    row_index = None
    if rows != "all":
        x_rows = m if rows == "permutation" else m + 7
        x = torch.randn(x_rows, i, generator=gen).requires_grad_()
        row_index = torch.randperm(x_rows, generator=gen)[:m]
    if x_bf16:
        x = x.detach().bfloat16().requires_grad_()
    extra = index = None
    if add is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        add_rows = int(torch.randint(1, 6, (1,), generator=gen)) if indexed else m
        extra = torch.randn(add_rows, o, generator=gen).to(add).requires_grad_()
        index = torch.randint(0, add_rows, (m,), generator=gen) if indexed else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear_module.native_linear_dtype(x, w) == torch.bfloat16
            y = linear(x, w, b, add=extra, add_index=index, rows=row_index)
        inputs = [t for t in (x, w, b, extra) if t is not None]
        got = [y.detach(), *torch.autograd.grad(y, inputs, g.bfloat16())]
    finally:
        torch.set_num_threads(before)
    assert y.dtype == torch.bfloat16 and got[1].dtype == x.dtype and got[1].shape == x.shape
    ref_in = [_bf16(x), _bf16(w), None if b is None else b.detach().double().requires_grad_()]
    ref_extra = None if extra is None else extra.detach().double().requires_grad_()
    ref_x = ref_in[0] if row_index is None else ref_in[0].index_select(0, row_index)
    want_y = F.linear(ref_x, *ref_in[1:]) + (
        0 if ref_extra is None else ref_extra if index is None else ref_extra.index_select(0, index)
    )
    want = [
        want_y,
        *torch.autograd.grad(
            want_y, [t for t in (*ref_in, ref_extra) if t is not None], g.bfloat16().double()
        ),
    ]
    # y and dx: one bf16 rounding (relative 2^-8) of a float32 sum; dW, db, d(add): float32 sums of exact products.
    torch.testing.assert_close(got[0].double(), want[0], rtol=2**-8, atol=1e-3)
    torch.testing.assert_close(got[1].double(), want[1], rtol=2**-8, atol=1e-3)
    for a, e in zip(got[2:], want[2:]):
        # An indexed bf16 add's gradient: a float32 sum over rows, rounded once to bf16.
        rtol = 2**-8 if a.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=1e-4)


def test_bf16_kernel_agrees_with_autocasts_f_linear() -> None:
    # Against the op it replaces (bias rounded to bf16 there, not here): within a bf16 step of each other.
    x, w, b, g = _case(1000, 64, 80, True, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _grads(linear, x, w, b, g.bfloat16())
        theirs = _grads(F.linear, x, w, b, g.bfloat16())
    for a, e in zip(ours, theirs):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a.double(), e.double(), rtol=2**-7, atol=2e-2 * float(e.abs().max()))


def test_bf16_rows_and_input_gradients_do_not_depend_on_the_thread_count() -> None:
    x, w, b, g = _case(1000, 40, 24, True, 3)
    g = g.bfloat16()
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                runs.append(_grads(linear, x, w, b, g))
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert torch.equal(runs[0][0], other[0]) and torch.equal(runs[0][1], other[1])
        for a, e in zip(runs[0][2:], other[2:]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4)


def test_mlp_under_bf16_autocast_runs_the_kernel_without_padding_rows(monkeypatch) -> None:
    # Every layer through the kernel (spy), none through the row-bucket padding, and the result equals the
    # plain layers under autocast to a bf16 step.
    from din_torchrec.modules import mlp as mlp_module

    calls, padded = [], []
    real = linear_module._NativeLinear.apply
    monkeypatch.setattr(linear_module._NativeLinear, "apply", lambda *a: calls.append(1) or real(*a))
    real_pad = torch.nn.functional.pad
    monkeypatch.setattr(torch.nn.functional, "pad", lambda *a, **k: padded.append(1) or real_pad(*a, **k))
    torch.manual_seed(0)
    # sigmoid, not relu: a smooth activation, so that a pre-activation a bf16 step either side of a kink cannot
    # send the two runs' gradients down different paths.
    mlp = MLP(12, [20, 10], activation="sigmoid", out_features=1)
    x = torch.randn(3 * mlp_module.ROW_BUCKET + 5, 12, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
        ref = mlp.layers(x)
    assert len(calls) == 3 and not padded and y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), ref.double(), rtol=2**-6, atol=2e-2)
    gy = torch.autograd.grad(y.float().sum(), [x, *mlp.parameters()])
    gref = torch.autograd.grad(ref.float().sum(), [x, *mlp.parameters()])
    for a, e in zip(gy, gref):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a.double(), e.double(), rtol=2**-5, atol=3e-2 * float(e.abs().max()))


def test_indexed_add_checks_its_index() -> None:
    x, w, _, _ = _case(10, 8, 6, False, 0)
    add = torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match=r"add_index\[4\] = 3 is outside \[0, 3\)"):
            linear(x, w, None, add=add, add_index=torch.tensor([0, 1, 2, 0, 3, 1, 1, 1, 1, 1]))
        with pytest.raises(RuntimeError, match="add_index must be int64"):
            linear(x, w, None, add=add, add_index=torch.zeros(10, dtype=torch.int32))
        with pytest.raises(ValueError, match="add_index given without add"):
            linear(x, w, None, add_index=torch.zeros(10, dtype=torch.long))
    # Outside the kernel (float64) the same call is the gather itself.
    idx = torch.tensor([2, 0, 0, 1, 2, 2, 1, 0, 0, 1])
    torch.testing.assert_close(
        linear(x.double(), w.double(), None, add=add.double(), add_index=idx),
        F.linear(x.double(), w.double()) + add.double()[idx],
    )


def test_rows_must_be_distinct_and_in_range() -> None:
    x, w, _, _ = _case(6, 8, 5, False, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(RuntimeError, match=r"rows\[2\] = 1 repeats an earlier row"):
            linear(x, w, rows=torch.tensor([0, 1, 1]))
        with pytest.raises(RuntimeError, match=r"rows\[1\] = 6 is outside \[0, 6\)"):
            linear(x, w, rows=torch.tensor([0, 6]))
    # Outside the kernel: the gather itself.
    idx = torch.tensor([5, 0, 3])
    torch.testing.assert_close(
        linear(x.double(), w.double(), rows=idx), F.linear(x.double()[idx], w.double())
    )
