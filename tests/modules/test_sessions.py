"""Session division: vectorised boundaries vs the per-user loop, and the dense session block vs a per-sample
Python reference."""

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from din_torchrec.modules.sessions import session_boundaries, session_boundaries_reference, sessionize

GAP = 30

# Gaps chosen to hit the edges: ties (0), exactly the threshold, one either side, and far apart.
_gaps = st.sampled_from([0, 1, GAP - 1, GAP, GAP + 1, 5 * GAP, 10_000])
_history = st.tuples(st.integers(0, 2**31), st.lists(_gaps, max_size=9))  # (first timestamp, gaps)
_histories = st.lists(_history, min_size=1, max_size=6)


def _jagged(histories: list[tuple[int, list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(timestamps [N], lengths [B]); a history of g gaps has g behaviours (so g = 0 is empty)."""
    ts: list[int] = []
    lengths = []
    for start, gaps in histories:
        t = start
        for g in gaps:
            t += g
            ts.append(t)
        lengths.append(len(gaps))
    return torch.tensor(ts, dtype=torch.long), torch.tensor(lengths, dtype=torch.long)


def _sessionize_reference(values, timestamps, lengths, gap, k_max, l_max):
    """Per sample: split by the reference ids, keep the last K sessions and the last L of each, left-aligned."""
    b, d = lengths.numel(), values.shape[-1]
    ids = session_boundaries_reference(timestamps, lengths, gap).tolist()
    out = torch.zeros(b, k_max, l_max, d)
    bmask = torch.zeros(b, k_max, l_max, dtype=torch.bool)
    smask = torch.zeros(b, k_max, dtype=torch.bool)
    start = 0
    for i, n in enumerate(lengths.tolist()):
        sessions: list[list[int]] = []
        for j in range(start, start + n):
            if not sessions or ids[j] != ids[j - 1]:
                sessions.append([])
            sessions[-1].append(j)
        for slot, rows in enumerate(sessions[-k_max:]):
            smask[i, slot] = True
            for pos, row in enumerate(rows[-l_max:]):
                out[i, slot, pos] = values[row]
                bmask[i, slot, pos] = True
        start += n
    return out, bmask, smask


def test_reference_on_a_hand_example() -> None:
    """Pins the convention itself: strict '>' (a gap equal to the threshold stays), ties stay, ids per sample."""
    ts = torch.tensor([100, 100 + GAP, 100 + GAP, 100 + 2 * GAP + 1, 7, 5000, 5000 + GAP + 1])
    lengths = torch.tensor([4, 0, 1, 2])
    expected = torch.tensor([0, 0, 0, 1, 0, 0, 1])
    assert torch.equal(session_boundaries_reference(ts, lengths, GAP), expected)
    assert torch.equal(session_boundaries(ts, lengths, GAP), expected)


@settings(max_examples=60, deadline=None)
@given(histories=_histories)
def test_boundaries_equal_per_user_reference(histories) -> None:
    ts, lengths = _jagged(histories)
    got = session_boundaries(ts, lengths, GAP)
    ref = session_boundaries_reference(ts, lengths, GAP)
    assert got.dtype == torch.long
    assert torch.equal(got, ref), f"vectorised ids {got.tolist()} != per-user loop {ref.tolist()}"


def test_boundaries_do_not_leak_across_samples() -> None:
    """The first behaviour of a sample starts its session 0 even when its timestamp continues the previous
    sample's last session (same time, no gap)."""
    ts = torch.tensor([10, 11, 11, 12])
    lengths = torch.tensor([2, 2])
    assert torch.equal(session_boundaries(ts, lengths, GAP), torch.tensor([0, 0, 0, 0]))
    ts = torch.tensor([10, 10 + 2 * GAP, 10 + 2 * GAP, 10 + 4 * GAP])
    assert torch.equal(session_boundaries(ts, lengths, GAP), torch.tensor([0, 1, 0, 1]))


@settings(max_examples=50, deadline=None)
@given(histories=_histories, k_max=st.integers(1, 4), l_max=st.integers(1, 4))
def test_sessionize_equals_per_sample_reference(histories, k_max, l_max) -> None:
    ts, lengths = _jagged(histories)
    values = torch.randn(ts.numel(), 3)
    got = sessionize(values, ts, lengths, GAP, k_max, l_max)
    ref = _sessionize_reference(values, ts, lengths, GAP, k_max, l_max)
    assert got[0].shape == (lengths.numel(), k_max, l_max, 3)
    assert torch.equal(got[1], ref[1]), "behaviour mask: wrong slots (most recent K / L not kept?)"
    assert torch.equal(got[2], ref[2]), "session mask: wrong number of kept sessions"
    assert torch.equal(got[0], ref[0]), "a behaviour landed in the wrong slot"
    assert torch.equal(got[2], got[1].any(-1))


def test_sessionize_keeps_most_recent_sessions_and_behaviours() -> None:
    """One user, 4 sessions of sizes 1, 3, 2, 4 (values = index); K = 2, L = 3."""
    sizes = [1, 3, 2, 4]
    ts, t = [], 0
    for s in sizes:
        t += 10 * GAP
        for _ in range(s):
            ts.append(t)
            t += 1
    values = torch.arange(10, dtype=torch.float32).unsqueeze(1)
    out, bmask, smask = sessionize(values, torch.tensor(ts), torch.tensor([10]), GAP, 2, 3)
    # Sessions 2 (rows 4, 5) and 3 (rows 6..9, most recent 3 = 7, 8, 9) survive, oldest kept in slot 0.
    assert out[0, :, :, 0].tolist() == [[4.0, 5.0, 0.0], [7.0, 8.0, 9.0]]
    assert bmask[0].tolist() == [[True, True, False], [True, True, True]]
    assert smask[0].tolist() == [True, True]


def test_sessionize_gradient_reaches_kept_behaviours_only() -> None:
    ts = torch.tensor([0, 1, 2, 100, 101])
    values = torch.randn(5, 2, requires_grad=True)
    out, _, _ = sessionize(values, ts, torch.tensor([5]), GAP, 1, 1)  # keeps only row 4
    out.sum().backward()
    expected = torch.zeros(5, 2)
    expected[4] = 1
    assert torch.equal(values.grad, expected)


def test_sessionize_empty_batch_and_empty_histories() -> None:
    out, bmask, smask = sessionize(
        torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.tensor([0, 0]), GAP, 3, 2
    )
    assert out.shape == (2, 3, 2, 4) and not bmask.any() and not smask.any()
