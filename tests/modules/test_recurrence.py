"""The single-node packed recurrence (modules/recurrence.py) against plain autograd loops of each cell's
equations: values, and gradients of every input (gradcheck in float64), on random jagged batches with empty
and length-1 histories."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from din_torchrec.modules.interest_evolution import packed_layout
from din_torchrec.modules.recurrence import MODES, PackedRecurrence, packed_recurrence


def _loop(x, att, w, b, steps, mode, hidden):
    """Plain autograd loop, written from the equations in the module table (not from the fast code)."""
    h, outs, start = x.new_zeros(steps[0] if steps else 0, hidden), [], 0
    H = hidden
    for n in steps:
        xs, hp = x[start : start + n], h[:n]
        hh = hp @ w.t() + (b if b is not None else 0)
        if mode == "gru":
            r = torch.sigmoid(xs[:, :H] + hh[:, :H])
            z = torch.sigmoid(xs[:, H : 2 * H] + hh[:, H : 2 * H])
            cand = torch.tanh(xs[:, 2 * H :] + r * hh[:, 2 * H :])
            h = (1 - z) * cand + z * hp
        elif mode in ("augru", "ugru"):
            u = torch.sigmoid(xs[:, :H] + hh[:, :H])
            r = torch.sigmoid(xs[:, H : 2 * H] + hh[:, H : 2 * H])
            cand = torch.tanh(xs[:, 2 * H :] + r * hh[:, 2 * H :])
            if mode == "augru":
                u = att[start : start + n, None] * u
            h = (1 - u) * hp + u * cand
        else:
            r = torch.sigmoid(xs[:, :H] + hh[:, :H])
            cand = torch.tanh(xs[:, H:] + r * hh[:, H:])
            a = att[start : start + n, None]
            h = (1 - a) * hp + a * cand
        outs.append(h)
        start += n
    return torch.cat(outs) if outs else x.new_zeros(0, hidden)


def _inputs(mode: str, n: int, hidden: int, dtype=torch.float64):
    g = (2 if mode == "agru" else 3) * hidden
    x = torch.randn(n, g, dtype=dtype, requires_grad=True)
    att = torch.rand(n, dtype=dtype, requires_grad=True) if mode in ("augru", "agru") else None
    w = torch.randn(g, hidden, dtype=dtype, requires_grad=True)
    b = torch.randn(g, dtype=dtype, requires_grad=True) if mode == "gru" else None
    return x, att, w, b


@settings(max_examples=30, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 7), min_size=1, max_size=6),
    mode=st.sampled_from(MODES),
    seed=st.integers(0, 2**16),
)
def test_recurrence_equals_the_autograd_loop_forward_and_grad(lengths, mode, seed) -> None:
    torch.manual_seed(seed)
    hidden = 3
    steps = packed_layout(torch.tensor(lengths)).steps
    x, att, w, b = _inputs(mode, sum(lengths), hidden)
    out = packed_recurrence(x, att, w, b, steps, mode)
    ref = _loop(x, att, w, b, steps, mode, hidden)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if sum(lengths) == 0:
        return
    inputs = [t for t in (x, att, w, b) if t is not None]
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), inputs)
    want = torch.autograd.grad((ref * g).sum(), inputs)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_recurrence_passes_gradcheck(mode: str) -> None:
    torch.manual_seed(0)
    steps = packed_layout(torch.tensor([3, 0, 1, 4, 1])).steps
    x, att, w, b = _inputs(mode, 9, 2)

    def f(x, att, w, b):
        return packed_recurrence(x, att, w, b, steps, mode)

    assert torch.autograd.gradcheck(f, (x, att, w, b))


def test_recurrence_under_bf16_autocast_runs_in_float32() -> None:
    # States, gates and sums in float32; on the CPU the per-step products take bf16 operands (as autocast's own
    # GRU): the float32 recurrence on bf16-rounded U and states, i.e. within bf16 rounding of the float32 one.
    torch.manual_seed(1)
    steps = packed_layout(torch.tensor([4, 2, 3])).steps
    x, att, w, _ = _inputs("augru", 9, 4, dtype=torch.float32)
    ref = packed_recurrence(x, att, w, None, steps, "augru")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = packed_recurrence(x, att, w, None, steps, "augru")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.0, atol=0.02)
    rounded = PackedRecurrence.apply(x, att, w, None, steps, "augru", None, True)
    torch.testing.assert_close(out, rounded, rtol=1e-5, atol=1e-6)


def test_recurrence_rejects_wrong_arguments() -> None:
    steps = [2, 1]
    x, att, w, b = _inputs("augru", 3, 2)
    with pytest.raises(ValueError, match="mode must be one of"):
        packed_recurrence(x, att, w, None, steps, "lstm")
    with pytest.raises(ValueError, match="att is required"):
        packed_recurrence(x, None, w, None, steps, "augru")
    with pytest.raises(ValueError, match="bias_hh is required"):
        packed_recurrence(x, None, w, None, steps, "gru")
    with pytest.raises(ValueError, match="steps sum to 4"):
        packed_recurrence(x, att, w, None, [2, 2], "augru")
    with pytest.raises(ValueError, match=r"expected x \[N, 4\]"):
        packed_recurrence(x, att, w, None, steps, "agru")
