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
    NativeProjectedRecurrence,
    PackedRecurrence,
    _recurrence_function,
    packed_recurrence,
    projected_recurrence,
    projected_recurrence_reference,
)
from din_torchrec.ops import native
from tests.modules.test_recurrence import _inputs, _loop

pytestmark = pytest.mark.skipif(native.kernels() is None, reason="the native kernels did not build")


def _grads(fn, inputs, g):
    out = fn(*inputs)
    grads = torch.autograd.grad((out * g).sum(), [t for t in inputs if t is not None])
    return out, grads


def _float32_case(lengths: list[int], mode: str, hidden: int, seed: int):
    """Steps, float32 inputs and an upstream gradient for a random jagged batch (an all-empty one gets one
    behaviour). nn.GRU's scale of weights: with N(0, 1) weights at hidden 32 a few steps are already chaotic
    and float32 rounding differences between any two correct implementations grow past the tolerances."""
    torch.manual_seed(seed)
    if sum(lengths) == 0:
        lengths[0] = 1
    steps = packed_layout(torch.tensor(lengths)).steps
    x, att, w, b = _inputs(mode, sum(lengths), hidden, dtype=torch.float32)
    w = (w.detach() / hidden**0.5).requires_grad_()
    return steps, x, att, w, b, torch.randn(sum(lengths), hidden)


def _apply_on_present(fn, steps, mode, att, b, fold_bias=False, bf16_products=False):
    """``fn.apply`` taking only the inputs that are present, ``(x, [att], w, [b], input_bias)``, in that order
    (what ``torch.autograd.grad`` differentiates); ``fold_bias``: ``x + input_bias`` instead of passing it;
    ``bf16_products`` passed on."""

    def call(*args):
        it = iter(args)
        x = next(it)
        a = next(it) if att is not None else None
        w = next(it)
        bb = next(it) if b is not None else None
        bias = next(it)
        if fold_bias:
            return fn.apply(x + bias, a, w, bb, steps, mode, None, bf16_products)
        return fn.apply(x, a, w, bb, steps, mode, bias, bf16_products)

    return call


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=12),
    mode=st.sampled_from(MODES),
    hidden=st.sampled_from([1, 3, 16, 19, 32]),
    seed=st.integers(0, 2**16),
)
def test_native_recurrence_equals_the_float64_loop(lengths, mode, hidden, seed) -> None:
    steps, x, att, w, b, g = _float32_case(lengths, mode, hidden, seed)
    inputs = (x, att, w, b)

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


def test_packed_recurrence_takes_the_native_path_for_float32_and_bfloat16_cpu_tensors_only() -> None:
    assert _recurrence_function(torch.randn(4, 6)) is NativePackedRecurrence
    assert _recurrence_function(torch.randn(4, 6, dtype=torch.bfloat16)) is NativePackedRecurrence
    assert _recurrence_function(torch.randn(4, 6, dtype=torch.float64)) is PackedRecurrence
    # under bf16 autocast the inputs are cast to float32 first: native again
    steps = packed_layout(torch.tensor([3, 1])).steps
    x, att, w, _ = _inputs("augru", 4, 2, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_recurrence(x, att, w, None, steps, "augru")
    assert out.dtype == torch.float32 and out.grad_fn.name().startswith("NativePackedRecurrence")


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=12),
    mode=st.sampled_from(MODES),
    hidden=st.sampled_from([1, 3, 16, 32]),
    seed=st.integers(0, 2**16),
)
def test_input_bias_inside_the_kernel_equals_adding_it_before(lengths, mode, hidden, seed) -> None:
    """``input_bias`` added in the kernel's loop (and its gradient summed there) against ``x + b`` through
    autograd, for the native kernel and the PyTorch function alike."""
    steps, x, att, w, b, g = _float32_case(lengths, mode, hidden, seed)
    bias = torch.randn(x.shape[1], requires_grad=True)
    inputs = tuple(t for t in (x, att, w, b, bias) if t is not None)
    for fn in (NativePackedRecurrence, PackedRecurrence):
        out, grads = _grads(_apply_on_present(fn, steps, mode, att, b), inputs, g)
        ref, ref_grads = _grads(_apply_on_present(fn, steps, mode, att, b, fold_bias=True), inputs, g)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * (1 + float(want.abs().max())))


@pytest.mark.parametrize("mode", MODES)
def test_bfloat16_input_is_widened_in_the_kernel_and_its_gradient_returned_in_bfloat16(mode: str) -> None:
    """A bfloat16 ``x`` read by the kernel as it is, against the float32 kernel on the same values (``x``
    rounded to bfloat16, then widened): the same states and float32 gradients (to float32 rounding: the two
    instantiations' loops vectorise differently under -ffast-math); ``x``'s gradient comes back in bfloat16,
    the float32 one rounded (to one bfloat16 step). Through :func:`packed_recurrence` under autocast too."""
    torch.manual_seed(7)
    lengths = torch.randint(0, 30, (64,))
    lengths[:2] = torch.tensor([0, 1])
    steps = packed_layout(lengths).steps
    x, att, w, b = _inputs(mode, int(lengths.sum()), 16, dtype=torch.float32)
    w = (w.detach() / 4).requires_grad_()
    bias = torch.randn(x.shape[1], requires_grad=True)
    x16 = x.detach().bfloat16().requires_grad_()
    x32 = x16.detach().float().requires_grad_()
    g = torch.randn(int(lengths.sum()), 16)
    rest = tuple(t for t in (att, w, b, bias) if t is not None)
    call = _apply_on_present(NativePackedRecurrence, steps, mode, att, b)
    out16, grads16 = _grads(call, (x16, *rest), g)
    out32, grads32 = _grads(call, (x32, *rest), g)
    assert out16.dtype == torch.float32 and grads16[0].dtype == torch.bfloat16
    torch.testing.assert_close(out16, out32, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads16[0].float(), grads32[0].bfloat16().float(), rtol=8e-3, atol=1e-6)
    for got, want in zip(grads16[1:], grads32[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * (1 + float(want.abs().max())))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_recurrence(x16, att, w, b, steps, mode, bias)
    assert out.grad_fn.name().startswith("NativePackedRecurrence")
    # Under autocast the per-step products also take bf16 operands (test below): close to the float32 products.
    torch.testing.assert_close(out, out32, rtol=0.0, atol=0.05)
    want = _apply_on_present(NativePackedRecurrence, steps, mode, att, b, bf16_products=True)(x16, *rest)
    torch.testing.assert_close(out, want, rtol=0.0, atol=0.0)


@pytest.mark.parametrize("mode", ["gru", "augru"])
def test_steps_split_over_threads_give_the_single_thread_result(mode: str) -> None:
    """Each step's rows are split into one part per thread (the part's U h product and gate loop): every row's
    arithmetic is the same whichever part it falls in, so states and per-row gradients match the one-thread
    run; the input bias's gradient is summed per part and may differ in rounding only."""
    torch.manual_seed(11)
    lengths = torch.randint(0, 40, (700,))
    lengths[:2] = torch.tensor([0, 1])
    steps = packed_layout(lengths).steps
    assert steps[0] >= 3 * 128  # split into parts at 2 and 3 threads
    x, att, w, b = _inputs(mode, int(lengths.sum()), 32, dtype=torch.float32)
    w = (w.detach() / 32**0.5).requires_grad_()
    bias = torch.randn(x.shape[1], requires_grad=True)
    g = torch.randn(int(lengths.sum()), 32)
    inputs = tuple(t for t in (x, att, w, b, bias) if t is not None)
    call = _apply_on_present(NativePackedRecurrence, steps, mode, att, b)
    before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = _grads(call, inputs, g)
    finally:
        torch.set_num_threads(before)
    out1, grads1 = results[1]
    for threads in (2, 3):
        out, grads = results[threads]
        torch.testing.assert_close(out, out1, rtol=1e-6, atol=1e-6)
        for got, want in zip(grads, grads1):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * (1 + float(want.abs().max())))


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 30), min_size=1, max_size=40),
    mode=st.sampled_from(MODES),
    hidden=st.sampled_from([2, 8, 16, 32]),
    x_bf16=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_bf16_products_equal_the_reference_on_rounded_operands(lengths, mode, hidden, x_bf16, seed) -> None:
    """bf16 products (the kernel under bf16 autocast): U h, the gradient through U h and U's gradient on
    operands rounded to bf16 with float32 sums, against PackedRecurrence doing exactly that in PyTorch (round,
    then a float32 matmul: products of bf16 values are exact in float32). Equal up to float32 summation order,
    which may flip a state's bf16 rounding: tolerances a few bf16 steps of the products' contribution. And
    close to the float32-product recurrence (a bf16 rounding of every product's operands)."""
    steps, x, att, w, b, g = _float32_case(lengths, mode, hidden, seed)
    if x_bf16:
        x = x.detach().bfloat16().requires_grad_()
    bias = torch.randn(x.shape[1], requires_grad=True)
    inputs = tuple(t for t in (x, att, w, b, bias) if t is not None)
    got_out, got = _grads(
        _apply_on_present(NativePackedRecurrence, steps, mode, att, b, bf16_products=True), inputs, g
    )
    ref_inputs = tuple(t.detach().float().requires_grad_() if t is x else t for t in inputs)
    want_out, want = _grads(
        _apply_on_present(PackedRecurrence, steps, mode, att, b, bf16_products=True), ref_inputs, g
    )
    torch.testing.assert_close(got_out, want_out, rtol=1e-3, atol=1e-3)
    for a, e in zip(got, want):
        scale = 1 + float(e.abs().max())
        torch.testing.assert_close(a.float(), e, rtol=1e-2, atol=1e-3 * scale)
    f32_out, _ = _grads(_apply_on_present(NativePackedRecurrence, steps, mode, att, b), inputs, g)
    torch.testing.assert_close(got_out, f32_out, rtol=0.0, atol=0.05)


def test_bf16_products_need_an_even_hidden_size() -> None:
    steps, x, att, w, b, _ = _float32_case([3, 2], "gru", 3, 0)
    with pytest.raises(RuntimeError, match="bf16 products need an even hidden size"):
        NativePackedRecurrence.apply(x, att, w, b, steps, "gru", None, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # odd hidden size: float32 products under autocast
        out = packed_recurrence(x, att, w, b, steps, "gru")
    torch.testing.assert_close(
        out, NativePackedRecurrence.apply(x, att, w, b, steps, "gru"), rtol=1e-5, atol=1e-6
    )


def _projected_case(lengths: list[int], mode: str, hidden: int, inputs: int, with_rows: bool, seed: int):
    """A random jagged batch for the projected recurrence: ``(steps, x_in, rows, w_ih, bias, att, w_hh, b_hh,
    g)``; ``rows`` a permutation (the jagged-to-packed gather) or None (``x_in`` already packed)."""
    torch.manual_seed(seed)
    if sum(lengths) == 0:
        lengths[0] = 1
    layout = packed_layout(torch.tensor(lengths))
    n = sum(lengths)
    gates = (2 if mode == "agru" else 3) * hidden
    x_in = torch.randn(n, inputs, requires_grad=True)
    rows = layout.packed_index if with_rows else None
    w_ih = (torch.randn(gates, inputs) / inputs**0.5).requires_grad_()
    w_hh = (torch.randn(gates, hidden) / hidden**0.5).requires_grad_()
    bias = torch.randn(gates, requires_grad=True)
    b_hh = torch.randn(gates, requires_grad=True) if mode == "gru" else None
    att = torch.rand(n, requires_grad=True) if mode in ("augru", "agru") else None
    return layout.steps, x_in, rows, w_ih, bias, att, w_hh, b_hh, torch.randn(n, hidden)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=40),
    mode=st.sampled_from(MODES),
    hidden=st.sampled_from([2, 8, 16, 32]),
    inputs=st.sampled_from([2, 6, 32]),
    with_rows=st.booleans(),
    bf16_products=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_projection_inside_the_kernel_equals_projecting_first(
    lengths, mode, hidden, inputs, with_rows, bf16_products, seed
) -> None:
    """The input projection computed per step inside the kernel (NativeProjectedRecurrence) against the
    projection as one float32-sum matmul, then PackedRecurrence: states and the gradients of x_in (scattered
    back through ``rows``), both weights, both biases and the attention. float32: equal to rounding; bf16
    products: the kernel also rounds x's gradient to bf16 before the projection's backward (as a bf16 matmul's
    backward would) and the reference does not, hence bf16-step tolerances on x_in's and W_ih's gradients."""
    steps, x_in, rows, w_ih, bias, att, w_hh, b_hh, g = _projected_case(
        lengths, mode, hidden, inputs, with_rows, seed
    )
    params = [t for t in (x_in, w_ih, bias, att, w_hh, b_hh) if t is not None]

    def run(fn):
        out = fn(x_in, rows, w_ih, bias, att, w_hh, b_hh, steps, mode, bf16_products)
        return out, torch.autograd.grad((out * g).sum(), params)

    got, got_grads = run(NativeProjectedRecurrence.apply)
    want, want_grads = run(projected_recurrence_reference)
    tol = 1e-3 if bf16_products else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for i, (a, e) in enumerate(zip(got_grads, want_grads)):
        scale = 1 + float(e.abs().max())
        rtol = 1e-2 if bf16_products else 1e-4
        atol = (1e-2 if bf16_products and i < 2 else 1e-3 if bf16_products else 1e-5) * scale
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("mode", ["gru", "augru"])
def test_projected_recurrence_dispatch_and_fallback(mode: str) -> None:
    """Under bf16 autocast and in float32, CPU inputs take the kernel with the projection inside; float64 takes
    the caller's projection and packed_recurrence (PyTorch's function) -- the same result. Bad rows are named."""
    steps, x_in, rows, w_ih, bias, att, w_hh, b_hh, g = _projected_case(
        [0, 1, 5, 9, 3] * 20, mode, 16, 8, True, 3
    )

    def call(x, wi, b, a, wh, bh, autocast=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return projected_recurrence(
                x,
                rows,
                wi,
                b,
                a,
                wh,
                bh,
                steps,
                mode,
                project=lambda: x.index_select(0, rows) @ wi.t(),
            )

    args = (x_in, w_ih, bias, att, w_hh, b_hh)
    out = call(*args)
    assert out.grad_fn.name().startswith("NativeProjectedRecurrence")
    out_bf16 = call(*args, autocast=True)
    assert out_bf16.grad_fn.name().startswith("NativeProjectedRecurrence") and out_bf16.dtype == torch.float32
    torch.testing.assert_close(out_bf16, out, rtol=0.0, atol=0.05)
    out64 = call(*(None if t is None else t.double() for t in args))
    assert not out64.grad_fn.name().startswith("NativeProjectedRecurrence")
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-5)
    bad = rows.clone()
    bad[3] = x_in.shape[0]
    with pytest.raises(RuntimeError, match=r"x_rows\[3\] = .* is outside"):
        NativeProjectedRecurrence.apply(x_in, bad, w_ih, bias, att, w_hh, b_hh, steps, mode)
    bad[3] = rows[2]
    with pytest.raises(RuntimeError, match=r"x_rows\[3\] = .* repeats an earlier row"):
        NativeProjectedRecurrence.apply(x_in, bad, w_ih, bias, att, w_hh, b_hh, steps, mode)
    with pytest.raises(ValueError, match="expected x_in .X, I. and weight_ih .G, I."):
        projected_recurrence(
            x_in, rows, w_ih[:, :-1], bias, att, w_hh, b_hh, steps, mode, project=lambda: None
        )


@pytest.mark.parametrize("bf16_products", [False, True])
def test_projected_steps_split_over_threads_give_the_single_thread_result(bf16_products: bool) -> None:
    """Each step part projects its own rows into its own scratch: states do not depend on the thread count."""
    steps, x_in, rows, w_ih, bias, _, w_hh, b_hh, _ = _projected_case(
        [int(v) for v in torch.randint(0, 40, (700,), generator=torch.Generator().manual_seed(1))],
        "gru",
        32,
        32,
        True,
        11,
    )
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(
                NativeProjectedRecurrence.apply(
                    x_in, rows, w_ih, bias, None, w_hh, b_hh, steps, "gru", bf16_products
                )
            )
    finally:
        torch.set_num_threads(before)
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 12), min_size=1, max_size=40),
    mode=st.sampled_from(MODES),
    with_rows=st.booleans(),
    bf16_products=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_final_states_only_equal_the_last_rows_of_all_states(
    lengths, mode, with_rows, bf16_products, seed
) -> None:
    """``last_rows`` given, the kernel returns only each sequence's last state and its backward takes their
    ``[B0, H]`` gradient as it is (no ``[N, H]`` zeros): values and every gradient equal, bit for bit, to taking
    ``out[last_rows]`` of all states (whose gradient is zero on the other rows)."""
    steps, x_in, rows, w_ih, bias, att, w_hh, b_hh, _ = _projected_case(lengths, mode, 16, 8, with_rows, seed)
    layout = packed_layout(torch.tensor(lengths))
    params = [t for t in (x_in, w_ih, bias, att, w_hh, b_hh) if t is not None]
    g = torch.randn(steps[0], 16)

    def run(final_only: bool):
        args = (x_in, rows, w_ih, bias, att, w_hh, b_hh, steps, mode, bf16_products)
        if final_only:
            out = NativeProjectedRecurrence.apply(*args, layout.last_rows)
        else:
            out = NativeProjectedRecurrence.apply(*args).index_select(0, layout.last_rows)
        return out, torch.autograd.grad((out * g).sum(), params)

    got, got_grads = run(True)
    want, want_grads = run(False)
    assert got.shape == (steps[0], 16)
    assert torch.equal(got, want)
    for a, e in zip(got_grads, want_grads):
        assert torch.equal(a, e)


def test_final_states_only_check_the_shape_of_their_rows_and_gradient() -> None:
    steps, x_in, rows, w_ih, bias, att, w_hh, b_hh, _ = _projected_case([3, 0, 2, 5], "augru", 8, 4, True, 1)
    with pytest.raises(ValueError, match=r"last_rows must be \[3\] \(one row per sequence\), got \(2,\)"):
        projected_recurrence(
            x_in, rows, w_ih, bias, att, w_hh, b_hh, steps, "augru", lambda: None, torch.tensor([0, 1])
        )
    out, sig, cand, hh_n = native.kernels().recurrence_forward(
        x_in.detach(), att.detach(), w_hh.detach(), None, bias.detach(), steps, 1, False, rows, w_ih.detach()
    )
    with pytest.raises(
        RuntimeError, match=r"a final-state grad_out must be \[3, 8\] \(one row per sequence\)"
    ):
        native.kernels().recurrence_backward(
            torch.zeros(4, 8),
            att.detach(),
            w_hh.detach(),
            out,
            sig,
            cand,
            hh_n,
            steps,
            1,
            False,
            True,
            False,
            False,
            True,
        )


@pytest.mark.parametrize("kind", ["augru", "agru"])
def test_evolution_on_the_kernel_equals_its_autograd_loop_in_float32(kind: str) -> None:
    """InterestEvolution in float32 on the CPU runs the kernel and returns final states through ``last_rows``:
    final states, attention and every gradient as the autograd loop of the cell's steps (``forward_loop``),
    with empty and length-1 histories in the batch."""
    from din_torchrec.modules.interest_evolution import InterestEvolution

    torch.manual_seed(21)
    ev = InterestEvolution(8, 6, 8, kind=kind, attention_hidden=[6, 3], attention_activation="prelu")
    lens = torch.tensor([3, 0, 7, 1, 5, 7, 1, 0, 2])
    states = torch.randn(int(lens.sum()), 8, requires_grad=True)
    cand = torch.randn(lens.numel(), 8, requires_grad=True)
    inputs = [states, cand, *ev.parameters()]
    g = torch.randn(lens.numel(), 6)
    results = []
    for fn in (ev.forward, ev.forward_loop):
        final, att = fn(states, lens, cand)
        loss = (final * g).sum() + (att * torch.arange(float(att.numel()))).sum()
        results.append((final, att, torch.autograd.grad(loss, inputs)))
    (final, att, grads), (ref_final, ref_att, ref_grads) = results
    assert final.grad_fn is not None and torch.all(final[lens == 0] == 0)
    torch.testing.assert_close(final, ref_final, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(att, ref_att, rtol=1e-5, atol=1e-6)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
