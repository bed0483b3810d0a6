"""The float32 CPU linear layer through oneDNN's BRGEMM (din_torchrec.ops.linear, ``linear_kernel.h``) against
``F.linear`` in float64: output and every gradient, on shapes around the kernel's row blocks (128 rows) --
empty, one row, a block and one row over -- with and without bias, for 1, 2 and 3 threads; where it must not
run (autocast, float64) it is ``F.linear`` itself."""

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


@settings(max_examples=40, deadline=None)
@given(
    m=st.sampled_from([0, 1, 2, 127, 128, 129, 300]),
    i=st.integers(1, 70),
    o=st.integers(1, 60),
    bias=st.booleans(),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 10_000),
)
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
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear(x, w, b)
    assert y.dtype == torch.bfloat16 and not calls  # autocast: F.linear in bf16
    y = linear(x.double(), w.double(), b.double())
    assert y.dtype == torch.float64 and not calls
    linear(x, w, b)
    assert calls == [1]


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
