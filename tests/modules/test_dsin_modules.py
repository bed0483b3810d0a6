"""DSIN building blocks against per-session / per-sample references, and padding invariance of the whole
interaction."""

import math

import pytest
import torch
import torch.nn.functional as F

from din_torchrec.modules.session_interest import (
    BiasEncoding,
    DSINInteraction,
    SessionInterestExtractor,
    SessionInterestInteractor,
    SessionTargetAttention,
)
from din_torchrec.modules.sessions import sessionize

GAP = 60


def _dense_block(b: int, k: int, sl: int, d: int, seed: int):
    """Random ``[B, K, L, D]`` block with left-aligned real sessions/behaviours; sample 1 has no sessions."""
    g = torch.Generator().manual_seed(seed)
    sessions = torch.randn(b, k, sl, d, generator=g)
    n_sessions = torch.randint(1, k + 1, (b,), generator=g)
    n_sessions[1] = 0
    session_mask = torch.arange(k) < n_sessions.unsqueeze(1)
    sizes = torch.randint(1, sl + 1, (b, k), generator=g) * session_mask
    behaviour_mask = torch.arange(sl) < sizes.unsqueeze(-1)
    return sessions, behaviour_mask, session_mask


def _with_garbage(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[~mask] = torch.randn(int((~mask).sum()), x.shape[-1]) * 100
    return y


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.t() + layer.bias


def _extract_one_session(ex: SessionInterestExtractor, x: torch.Tensor) -> torch.Tensor:
    """The extractor on one session ``[n, D]`` of real behaviours, written out: heads, residual + LN, FFN."""
    mha = ex.attention
    h, d = mha.heads, mha.dim
    dh = d // h
    q, k, v = _linear(x, mha.q), _linear(x, mha.k), _linear(x, mha.v)
    heads = []
    for j in range(h):
        c = slice(j * dh, (j + 1) * dh)
        heads.append(torch.softmax(q[:, c] @ k[:, c].t() / math.sqrt(dh), dim=-1) @ v[:, c])
    a = _linear(torch.cat(heads, -1), mha.o)
    y = F.layer_norm(x + a, (d,), ex.norm1.weight, ex.norm1.bias)
    f = _linear(torch.relu(_linear(y, ex.ffn[0])), ex.ffn[2])
    y = F.layer_norm(y + f, (d,), ex.norm2.weight, ex.norm2.bias)
    return y.mean(0)


def test_bias_encoding_is_the_sum_of_three_biases() -> None:
    torch.manual_seed(0)
    k, sl, d = 3, 4, 5
    be = BiasEncoding(k, sl, d)
    for p in be.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(2, k, sl, d)
    out = be(x)
    for kk in range(k):
        for t in range(sl):
            for c in range(d):
                want = x[:, kk, t, c] + be.session_bias[kk] + be.position_bias[t] + be.unit_bias[c]
                torch.testing.assert_close(out[:, kk, t, c], want, msg=f"BE[{kk},{t},{c}] wrong")


@pytest.mark.parametrize("fused", [True, False])
def test_extractor_batched_over_all_sessions_equals_per_session_loop(fused: bool) -> None:
    torch.manual_seed(1)
    b, k, sl, d = 4, 3, 5, 8
    ex = SessionInterestExtractor(d, heads=2, ffn_hidden=12, fused=fused)
    for norm in (ex.norm1, ex.norm2):  # non-trivial affine LayerNorm, so a missing norm would show
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    sessions, bmask, smask = _dense_block(b, k, sl, d, seed=1)
    sessions.requires_grad_()
    out = ex(sessions, bmask)
    assert out.shape == (b, k, d)
    for i in range(b):
        for j in range(k):
            n = int(bmask[i, j].sum())
            if n == 0:
                assert torch.all(out[i, j] == 0), f"empty session ({i}, {j}) must give zeros"
                continue
            ref = _extract_one_session(ex, sessions[i, j, :n])
            torch.testing.assert_close(out[i, j], ref, rtol=1e-4, atol=1e-5, msg=f"session ({i}, {j})")
    torch.testing.assert_close(ex(_with_garbage(sessions.detach(), bmask), bmask), out, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.all(sessions.grad[~bmask] == 0), "padded behaviours must not receive gradient"
    assert torch.isfinite(sessions.grad).all()


def test_interactor_equals_unpadded_bilstm_per_sample() -> None:
    torch.manual_seed(2)
    b, k, d, h = 5, 4, 6, 3
    it = SessionInterestInteractor(d, h)
    interests = torch.randn(b, k, d)
    counts = torch.tensor([4, 0, 1, 3, 2])
    smask = torch.arange(k) < counts.unsqueeze(1)
    out = it(interests, smask)
    assert out.shape == (b, k, 2 * h)
    for i, n in enumerate(counts.tolist()):
        if n:
            ref, _ = it.lstm(interests[i : i + 1, :n])  # the real sessions only, nothing to pack
            torch.testing.assert_close(out[i, :n], ref[0], rtol=1e-5, atol=1e-6, msg=f"sample {i}")
        assert torch.all(out[i, n:] == 0), f"sample {i}: padding sessions must be zeros"
    garbage = _with_garbage(interests, smask)
    torch.testing.assert_close(it(garbage, smask), out)  # the backward direction must start at the last real


@pytest.mark.parametrize("hidden", [[], [8, 4]])
def test_session_target_attention_equals_formula(hidden: list[int]) -> None:
    torch.manual_seed(3)
    b, k, w, dq = 4, 5, 6, 4
    att = SessionTargetAttention(w, dq, hidden, activation="prelu")
    keys, query = torch.randn(b, k, w), torch.randn(b, dq)
    counts = torch.tensor([5, 0, 2, 1])
    mask = torch.arange(k) < counts.unsqueeze(1)
    pooled, weights = att(keys, mask, query)
    for i, n in enumerate(counts.tolist()):
        s = keys[i, :n]
        if hidden:
            c = (query[i] @ att.project.weight.t()).expand(n, w)
            x = torch.cat([s, c, s - c, s * c], dim=-1)
            scores = att.unit.rest(att.unit.first_activation(att.unit.first(x))).squeeze(-1)
        else:
            scores = s @ (att.bilinear.weight @ query[i])  # s_k^T W c
        a = torch.softmax(scores, 0)
        torch.testing.assert_close(weights[i, :n], a, rtol=1e-5, atol=1e-6, msg=f"sample {i}: weights")
        torch.testing.assert_close(pooled[i], a @ s if n else torch.zeros(w), rtol=1e-5, atol=1e-6)
        assert torch.all(weights[i, n:] == 0)
    p2, w2 = att(_with_garbage(keys, mask), mask, query)
    torch.testing.assert_close((p2, w2), (pooled, weights))


def _history(b: int, k: int, sl: int, d: int, seed: int):
    """Jagged history with at most k sessions of at most sl behaviours each (sample 1 empty)."""
    g = torch.Generator().manual_seed(seed)
    ts, lengths = [], []
    for i in range(b):
        n_sessions = 0 if i == 1 else int(torch.randint(1, k + 1, (1,), generator=g))
        t, n = 1_700_000_000, 0
        for _ in range(n_sessions):
            t += GAP + 1 + int(torch.randint(0, 5000, (1,), generator=g))
            for j in range(int(torch.randint(1, sl + 1, (1,), generator=g))):
                t += 0 if j == 0 else int(torch.randint(0, GAP + 1, (1,), generator=g))  # ties and == GAP
                ts.append(t)
                n += 1
        lengths.append(n)
    n = len(ts)
    return (
        torch.randn(n, d, generator=g),
        torch.tensor(ts, dtype=torch.long),
        torch.tensor(lengths),
        torch.randn(b, d, generator=g),
    )


def _pair(k: int, sl: int, hidden: list[int], extra_k: int = 3, extra_l: int = 4):
    """A DSIN with (K + extra_k, L + extra_l) and one with (K, L) sharing every weight (the bias encodings'
    first K / L entries)."""
    torch.manual_seed(4)
    kw = dict(dim=8, heads=2, gap_seconds=GAP, lstm_hidden=5, attention_hidden=hidden, ffn_hidden=16)
    big = DSINInteraction(max_sessions=k + extra_k, max_session_len=sl + extra_l, **kw)
    for p in big.bias_encoding.parameters():  # visible biases: a slot-indexing mistake would show
        torch.nn.init.normal_(p, std=0.5)
    small = DSINInteraction(max_sessions=k, max_session_len=sl, **kw)
    state = big.state_dict()
    state["bias_encoding.session_bias"] = state["bias_encoding.session_bias"][:k]
    state["bias_encoding.position_bias"] = state["bias_encoding.position_bias"][:sl]
    small.load_state_dict(state)
    return small, big


@pytest.mark.parametrize("hidden", [[], [16, 8]])
@pytest.mark.parametrize("train", [False, True])
def test_dsin_is_invariant_to_session_and_position_padding(hidden: list[int], train: bool) -> None:
    """Same data (at most K sessions of at most L behaviours), K vs K + 3 and L vs L + 4: same output. In
    training mode too: Dice's batch statistics only ever see real sessions."""
    k, sl = 3, 4
    small, big = _pair(k, sl, hidden)
    small.train(train)
    big.train(train)
    beh, ts, lengths, cand = _history(6, k, sl, 8, seed=5)
    beh_s, beh_b = beh.clone().requires_grad_(), beh.clone().requires_grad_()
    u_s, a_s = small(beh_s, ts, lengths, cand)
    u_b, a_b = big(beh_b, ts, lengths, cand)
    assert u_s.shape == (6, small.out_width) and small.out_width == 8 + 2 * 5
    assert a_s.shape == (6, k) and a_b.shape == (6, k + 3)
    torch.testing.assert_close(u_s, u_b, rtol=1e-5, atol=1e-5, msg="padding sessions/positions leaked")
    torch.testing.assert_close(a_s, a_b[:, :k])
    assert torch.all(a_b[:, k:] == 0)
    assert torch.all(u_s[1] == 0) and torch.all(a_s[1] == 0), "an empty history must give zeros"
    u_s.square().sum().backward()
    u_b.square().sum().backward()
    torch.testing.assert_close(beh_s.grad, beh_b.grad, rtol=1e-4, atol=1e-5)


def test_dsin_padded_slot_values_do_not_leak() -> None:
    small, _ = _pair(3, 4, [16, 8])
    small.eval()
    beh, ts, lengths, cand = _history(6, 3, 4, 8, seed=6)
    sessions, bmask, smask = sessionize(beh, ts, lengths, GAP, 3, 4)
    clean = small.forward_sessions(sessions, bmask, smask, cand)
    dirty = small.forward_sessions(_with_garbage(sessions, bmask), bmask, smask, cand)
    torch.testing.assert_close(dirty.interest, clean.interest, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dirty.interest_attention, clean.interest_attention)
    torch.testing.assert_close(dirty.state_attention, clean.state_attention)
    torch.testing.assert_close(clean.interest, small(beh, ts, lengths, cand)[0])


def test_dsin_depends_on_the_session_split() -> None:
    """Same behaviours, different gap threshold -> different sessions -> different interest (the model is not
    blind to time)."""
    small, _ = _pair(3, 4, [])
    small.eval()
    beh, ts, lengths, cand = _history(6, 3, 4, 8, seed=7)
    u1, _ = small(beh, ts, lengths, cand)
    small.gap_seconds = 10**9  # everything in one session
    u2, _ = small(beh, ts, lengths, cand)
    assert (u1 - u2).abs().max() > 1e-3
