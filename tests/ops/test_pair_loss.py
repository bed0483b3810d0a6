"""The fused auxiliary loss (din_torchrec.ops.pair_loss) against the gathered-pairs path it replaces
(``AuxiliaryNextBehaviourLoss.forward_unfused``) and the per-pair reference: values and every gradient, on
random jagged batches with empty and length-1 histories, with chunks small enough that pairs straddle chunk
boundaries and the last chunk is padded."""

from __future__ import annotations

import contextlib
import types

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from din_torchrec.modules.interest_evolution import AuxiliaryNextBehaviourLoss
from din_torchrec.ops import pair_loss
from din_torchrec.ops.native import kernels as native_kernels
from din_torchrec.ops.pair_loss import sigmoid_mlp_pair_loss


def _inputs(lengths: list[int], h: int, d: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    return [torch.randn(n, w, generator=g, dtype=dtype, requires_grad=True) for w in (h, d, d)]


def _loss_and_grads(fn, aux, xs, lengths, upstream: float = 1.0):
    loss = fn(*xs, torch.tensor(lengths, dtype=torch.long))
    grads = torch.autograd.grad(loss * upstream, xs + list(aux.parameters()))
    return loss.detach(), grads


def _linears(aux: AuxiliaryNextBehaviourLoss) -> list[torch.nn.Linear]:
    return [m for m in aux.mlp.layers if isinstance(m, torch.nn.Linear)]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 9), min_size=1, max_size=12).filter(lambda ls: sum(ls) > 0),
    hidden=st.sampled_from([(7,), (10, 6), (5, 4, 3)]),
    chunk=st.integers(1, 9),
    upstream=st.floats(0.1, 5.0),
    seed=st.integers(0, 10_000),
)
def test_fused_equals_unfused_and_per_pair_reference_float64(lengths, hidden, chunk, upstream, seed) -> None:
    torch.manual_seed(seed)
    aux = AuxiliaryNextBehaviourLoss(5, 3, hidden=hidden).double()
    xs = _inputs(lengths, 5, 3, seed)
    fused = _loss_and_grads(
        lambda s, b, n, lens: sigmoid_mlp_pair_loss(s, b, n, lens, _linears(aux), chunk_rows=chunk),
        aux,
        xs,
        lengths,
        upstream,
    )
    unfused = _loss_and_grads(aux.forward_unfused, aux, xs, lengths, upstream)
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-12, atol=1e-12)
    for got, want in zip(fused[1], unfused[1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if sum(max(n - 1, 0) for n in lengths) > 0:
        ref = aux.forward_reference(*xs, torch.tensor(lengths))
        torch.testing.assert_close(fused[0], ref.detach(), rtol=1e-12, atol=1e-12)


def test_forward_takes_the_fused_path_only_for_the_sigmoid_mlp_scorer() -> None:
    assert AuxiliaryNextBehaviourLoss(4, 4).fused
    assert not AuxiliaryNextBehaviourLoss(4, 4, activation="relu").fused
    assert not AuxiliaryNextBehaviourLoss(4, 4, scorer="dot").fused
    # With the flag off, forward is the unfused path: same value, different graph (no fused node).
    aux = AuxiliaryNextBehaviourLoss(4, 4, hidden=[6]).double()
    lengths = [3, 1, 4]
    xs = _inputs(lengths, 4, 4, 1)
    fused = aux(*xs, torch.tensor(lengths))
    aux.fused = False
    unfused = aux(*xs, torch.tensor(lengths))
    assert type(fused.grad_fn).__name__ == "_SigmoidMLPPairLossBackward"
    assert type(unfused.grad_fn).__name__ != "_SigmoidMLPPairLossBackward"
    torch.testing.assert_close(fused, unfused)


@pytest.mark.parametrize("lengths", [[1, 1, 0, 1], [1]])
def test_fused_without_pairs_is_zero_with_zero_gradients(lengths: list[int]) -> None:
    aux = AuxiliaryNextBehaviourLoss(4, 3, hidden=[5]).double()
    xs = _inputs(lengths, 4, 3, 2)
    loss, grads = _loss_and_grads(aux.forward, aux, xs, lengths)
    assert float(loss) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads)


def test_fused_under_bf16_autocast_matches_unfused_over_many_chunks() -> None:
    """DIEN's sizes (H = D = 32, [100, 50]), 3 chunks of 2048 target rows with the last one padded: the fused
    function rounds where the unfused bf16 path rounds (one bf16 rounding per matmul output), so both stay
    within bf16 distance of the float32 result, and of each other."""
    torch.manual_seed(0)
    lengths = [0, 1] + [50] * 100 + [7] * 140
    aux = AuxiliaryNextBehaviourLoss(32, 32, hidden=(100, 50))
    xs = _inputs(lengths, 32, 32, 3, dtype=torch.float32)
    exact = _loss_and_grads(aux.forward_unfused, aux, xs, lengths)
    results = {}
    for name, fn in (("fused", aux.forward), ("unfused", aux.forward_unfused)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[name] = _loss_and_grads(fn, aux, xs, lengths)
    assert results["fused"][0].dtype == torch.float32
    for name, (loss, grads) in results.items():
        torch.testing.assert_close(loss.float(), exact[0], rtol=2e-2, atol=0, msg=name)
        for got, want in zip(grads, exact[1]):
            assert got.dtype == want.dtype
            rel = float((got - want).norm() / want.norm())
            assert rel < 0.03, (name, rel)


def test_fused_forward_without_grad_gives_the_same_loss() -> None:
    aux = AuxiliaryNextBehaviourLoss(4, 4, hidden=[6]).double()
    lengths = [5, 0, 2, 9]
    xs = _inputs(lengths, 4, 4, 4)
    with torch.no_grad():
        quiet = aux(*xs, torch.tensor(lengths))
    torch.testing.assert_close(quiet, aux.forward_unfused(*xs, torch.tensor(lengths)).detach())


def test_unused_rows_get_exactly_zero_gradient() -> None:
    """The fused path scores each sample's first behaviour (no pair ends there) and masks it: the behaviour and
    negative gradients of those rows, and the state gradient of each sample's last row, must be exactly 0."""
    aux = AuxiliaryNextBehaviourLoss(4, 4, hidden=[6]).double()
    lengths = [3, 1, 4]
    xs = _inputs(lengths, 4, 4, 5)
    _, (g_states, g_beh, g_neg, *_) = _loss_and_grads(aux.forward, aux, xs, lengths)
    firsts, lasts = [0, 3, 4], [2, 3, 7]
    assert float(g_beh[firsts].abs().max()) == 0.0 and float(g_neg[firsts].abs().max()) == 0.0
    assert float(g_states[lasts].abs().max()) == 0.0
    assert float(g_beh[[1, 2, 5, 6, 7]].abs().min()) > 0.0


@pytest.mark.parametrize("chunk", [256, 512])
def test_fused_with_rounded_chunks_equals_unfused(chunk: int) -> None:
    """Chunk sizes rounded to multiples of 256 rows (N = 700: three chunks of 256 for chunk 256, two of 512
    for 512, the last one padded with zero rows)."""
    torch.manual_seed(3)
    lengths = [0, 1] + [9] * 76 + [3, 1, 11]
    assert sum(lengths) == 700
    aux = AuxiliaryNextBehaviourLoss(6, 5, hidden=(8, 4)).double()
    xs = _inputs(lengths, 6, 5, 6)
    fused = _loss_and_grads(
        lambda s, b, n, lens: sigmoid_mlp_pair_loss(s, b, n, lens, _linears(aux), chunk_rows=chunk),
        aux,
        xs,
        lengths,
    )
    unfused = _loss_and_grads(aux.forward_unfused, aux, xs, lengths)
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-12, atol=1e-12)
    for got, want in zip(fused[1], unfused[1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _native_case(lengths, h, d, hidden, seed):
    torch.manual_seed(seed)
    aux = AuxiliaryNextBehaviourLoss(h, d, hidden=hidden)
    xs = _inputs(lengths, h, d, seed, dtype=torch.float32)
    return aux, xs


def _run(aux, xs, lengths, precision: str, upstream: float = 0.7):
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with ctx:
        return _loss_and_grads(
            lambda s, b, n, lens: sigmoid_mlp_pair_loss(s, b, n, lens, _linears(aux)),
            aux,
            xs,
            lengths,
            upstream,
        )


def _exact(aux, xs, lengths, upstream: float = 0.7):
    hidden = [m.out_features for m in _linears(aux)[:-1]]
    aux64 = AuxiliaryNextBehaviourLoss(xs[0].shape[1], xs[1].shape[1], hidden=hidden).double()
    aux64.load_state_dict(aux.state_dict())
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    return _loss_and_grads(aux64.forward_unfused, aux64, xs64, lengths, upstream)


def _spy_paths(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts which implementation ran: the native kernel or the PyTorch chunk loop."""
    calls = {"native": 0, "python": 0}
    loop = pair_loss._chunk_loop
    monkeypatch.setattr(
        pair_loss, "_chunk_loop", lambda *a: calls.__setitem__("python", calls["python"] + 1) or loop(*a)
    )
    kernel = native_kernels()
    spy = types.SimpleNamespace(
        pair_loss_fused=lambda *a: (
            calls.__setitem__("native", calls["native"] + 1) or kernel.pair_loss_fused(*a)
        )
    )
    monkeypatch.setattr(pair_loss.native, "kernels", lambda: spy)
    return calls


@pytest.mark.skipif(native_kernels() is None, reason="the native kernels did not build")
@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=12).filter(lambda ls: sum(ls) > 0),
    hidden=st.sampled_from([(6,), (10, 4), (8, 6, 4)]),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 10_000),
)
def test_native_kernel_float32_equals_the_float64_reference(lengths, hidden, threads, seed) -> None:
    """The native kernel (pair_loss_kernel.h) in float32, blocks of 64 target rows (rows straddle blocks, a last
    block of any size), against the unfused path in float64: loss and every gradient."""
    aux, xs = _native_case(lengths, 6, 4, hidden, seed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = _run(aux, xs, lengths, "fp32")
    finally:
        torch.set_num_threads(before)
    want = _exact(aux, xs, lengths)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-7)
    for g, e in zip(got[1], want[1]):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(native_kernels() is None, reason="the native kernels did not build")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_native_kernel_at_dien_sizes_matches_the_pytorch_loop_and_splits_over_threads(
    precision: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DIEN's sizes (H = D = 32, [100, 50]), N = 9,001 (an odd last block). The kernel keeps pre-activations,
    logits and sums in float32 and rounds only the activations and the gradients it feeds into products, so
    under bf16 it is at least as close to the float64 result as the PyTorch loop (which rounds every op's
    output); 1, 2 and 3 threads agree up to float32 rounding."""
    lengths = [0, 1] + [50] * 160 + [9] * 110
    aux, xs = _native_case(lengths, 32, 32, (100, 50), 1)
    exact = _exact(aux, xs, lengths)
    calls = _spy_paths(monkeypatch)
    before = torch.get_num_threads()
    try:
        native = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            native[threads] = _run(aux, xs, lengths, precision)
        assert calls == {"native": 3, "python": 0}
        monkeypatch.setattr(pair_loss, "native_usable", lambda *a: False)
        torch.set_num_threads(1)
        python_loop = _run(aux, xs, lengths, precision)
        assert calls == {"native": 3, "python": 1}
    finally:
        torch.set_num_threads(before)

    def rel(got, want):
        return float((got.double() - want).norm() / want.norm())

    for got, py, want in zip(native[1][1], python_loop[1], exact[1]):
        if precision == "fp32":
            assert rel(got, want) < 1e-5
        else:
            assert rel(got, want) < max(1.5 * rel(py, want), 2e-3), (rel(got, want), rel(py, want))
    torch.testing.assert_close(
        native[1][0].double(), exact[0], rtol=1e-5 if precision == "fp32" else 1e-3, atol=0
    )
    for threads in (2, 3):
        loss, grads = native[threads]
        torch.testing.assert_close(loss, native[1][0], rtol=1e-6, atol=0)
        for got, one in zip(grads, native[1][1]):
            torch.testing.assert_close(got, one, rtol=1e-4, atol=1e-6 * (1 + float(one.abs().max())))


@pytest.mark.skipif(native_kernels() is None, reason="the native kernels did not build")
def test_bf16_with_odd_widths_takes_the_pytorch_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 right-hand sides pair rows in the micro-kernel's layout: an odd width runs the PyTorch loop under
    bf16 (same result as the loop), while float32 takes the kernel whatever the widths."""
    lengths = [3, 0, 7, 1, 12]
    aux, xs = _native_case(lengths, 5, 3, (7,), 2)
    calls = _spy_paths(monkeypatch)
    _run(aux, xs, lengths, "bf16")
    assert calls == {"native": 0, "python": 1}
    _run(aux, xs, lengths, "fp32")
    assert calls == {"native": 1, "python": 1}


@pytest.mark.skipif(native_kernels() is None, reason="the native kernels did not build")
def test_bf16_kernel_rounds_float32_inputs_exactly_as_casting_them_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under bf16 the kernel reads float32 states and behaviours directly, rounding them block by block: the
    same loss and gradients, bit for bit, as giving it the bf16 casts (its bf16-input path: the input
    gradients then rounded to bf16 on the way out); and with an upstream gradient of 1 it returns its float32
    gradients unscaled, equal to the scaled ones up to the scaling."""
    lengths = [0, 1, 50, 9, 130, 3]
    aux, xs = _native_case(lengths, 32, 32, (100, 50), 4)
    calls = _spy_paths(monkeypatch)
    from_float = _run(aux, xs, lengths, "bf16", upstream=1.0)
    rounded = [x.detach().bfloat16().requires_grad_() for x in xs]
    from_bf16 = _run(aux, rounded, lengths, "bf16", upstream=1.0)
    assert calls == {"native": 2, "python": 0}
    assert torch.equal(from_float[0], from_bf16[0])
    for a, b in zip(from_float[1], from_bf16[1]):
        assert a.dtype == torch.float32
        assert torch.equal(a.to(b.dtype), b)
    scaled = _run(aux, xs, lengths, "bf16", upstream=0.5)
    for a, b in zip(from_float[1], scaled[1]):
        torch.testing.assert_close(a * 0.5, b, rtol=1e-6, atol=0)
