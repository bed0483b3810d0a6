"""Masked attention family: each module against its formula written out per sample, masks, empty rows."""

import math

import pytest
import torch

from din_torchrec.modules.attention_family import (
    CoAttention,
    MultiHeadSelfAttention,
    MultiHeadTargetAttention,
    masked_softmax,
    scaled_dot_product_self_attention,
)


def _mask(b: int, t: int, seed: int, empty_rows: tuple[int, ...] = ()) -> torch.Tensor:
    """Random (not prefix) masks, some rows fully padded."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, t, generator=g) < 0.6
    m[:, 0] |= True  # at least one real position per row ...
    for r in empty_rows:  # ... except the rows meant to be empty
        m[r] = False
    return m


def _garbage(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with large random values written into its padded positions."""
    y = x.clone()
    y[~mask] = torch.randn(int((~mask).sum()), x.shape[-1]) * 1e3
    return y


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    out = x @ layer.weight.t()
    return out if layer.bias is None else out + layer.bias


def test_masked_softmax_zero_at_padding_and_on_empty_rows() -> None:
    scores = torch.randn(3, 5, requires_grad=True)
    mask = _mask(3, 5, 0, empty_rows=(1,))
    w = masked_softmax(scores, mask)
    w.sum().backward()
    assert torch.all(w[~mask] == 0), "padded positions must get exactly zero weight"
    torch.testing.assert_close(w.sum(1), torch.tensor([1.0, 0.0, 1.0]))
    assert torch.isfinite(scores.grad).all(), "a fully padded row must not give NaN gradients"


def test_self_attention_equals_formula_and_ignores_padding() -> None:
    torch.manual_seed(1)
    b, t, d = 4, 6, 5
    x, mask = torch.randn(b, t, d, requires_grad=True), _mask(b, t, 1, empty_rows=(2,))
    out = scaled_dot_product_self_attention(x, mask)
    for i in range(b):
        real = mask[i].nonzero().squeeze(1)
        xi = x[i, real]
        ref = torch.softmax(xi @ xi.t() / math.sqrt(d), dim=-1) @ xi
        torch.testing.assert_close(out[i, real], ref, msg=f"row {i}: not softmax(X X^T / sqrt(D)) X")
    assert torch.all(out[~mask] == 0), "padded query positions must output zeros"
    assert torch.all(out[2] == 0), "a fully padded row must give zeros"
    torch.testing.assert_close(out, scaled_dot_product_self_attention(_garbage(x.detach(), mask), mask))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("fused", [True, False])
def test_multi_head_self_attention_equals_formula(fused: bool) -> None:
    torch.manual_seed(2)
    b, t, d, h = 4, 7, 8, 2
    dh = d // h
    mha = MultiHeadSelfAttention(d, h, fused=fused)
    x, mask = torch.randn(b, t, d, requires_grad=True), _mask(b, t, 2, empty_rows=(3,))
    out = mha(x, mask)
    for i in range(b):
        real = mask[i].nonzero().squeeze(1)
        if real.numel() == 0:
            continue
        xi = x[i, real]
        q, k, v = _linear(xi, mha.q), _linear(xi, mha.k), _linear(xi, mha.v)
        heads = []
        for j in range(h):
            cols = slice(j * dh, (j + 1) * dh)
            a = torch.softmax(q[:, cols] @ k[:, cols].t() / math.sqrt(dh), dim=-1)
            heads.append(a @ v[:, cols])
        ref = _linear(torch.cat(heads, dim=-1), mha.o)
        torch.testing.assert_close(out[i, real], ref, rtol=1e-5, atol=1e-5, msg=f"row {i} differs")
    assert torch.all(out[~mask] == 0), "padded positions (the output bias included) must be zeros"
    assert torch.all(out[3] == 0), "a fully padded row must give zeros, not NaN"
    torch.testing.assert_close(out, mha(_garbage(x.detach(), mask), mask), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(mha.q.weight.grad).all()


def test_fused_and_plain_self_attention_agree_forward_and_grad() -> None:
    torch.manual_seed(3)
    fused, plain = MultiHeadSelfAttention(8, 4, fused=True), MultiHeadSelfAttention(8, 4, fused=False)
    plain.load_state_dict(fused.state_dict())
    x, mask = torch.randn(5, 6, 8), _mask(5, 6, 3, empty_rows=(0,))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    o1, o2 = fused(x1, mask), plain(x2, mask)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    o1.square().sum().backward()
    o2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.k.weight.grad, plain.k.weight.grad, rtol=1e-4, atol=1e-5)


def test_multi_head_target_attention_equals_formula() -> None:
    torch.manual_seed(4)
    b, t, d, h = 5, 6, 6, 3
    dh = d // h
    att = MultiHeadTargetAttention(d, h)
    query, keys = torch.randn(b, d), torch.randn(b, t, d, requires_grad=True)
    mask = _mask(b, t, 4, empty_rows=(1,))
    out, weights = att(query, keys, mask)
    assert out.shape == (b, d) and weights.shape == (b, h, t)
    for i in range(b):
        real = mask[i].nonzero().squeeze(1)
        if real.numel() == 0:
            continue
        q, k, v = _linear(query[i], att.q), _linear(keys[i, real], att.k), _linear(keys[i, real], att.v)
        heads = []
        for j in range(h):
            cols = slice(j * dh, (j + 1) * dh)
            w = torch.softmax(k[:, cols] @ q[cols] / math.sqrt(dh), dim=0)
            torch.testing.assert_close(weights[i, j, real], w, msg=f"sample {i} head {j}: weights differ")
            heads.append(w @ v[:, cols])
        torch.testing.assert_close(out[i], _linear(torch.cat(heads), att.o), rtol=1e-5, atol=1e-5)
    assert torch.all(weights.transpose(1, 2)[~mask] == 0), "padded keys must get zero weight in every head"
    assert torch.all(out[1] == 0) and torch.all(weights[1] == 0), "no keys: zeros, not the output bias/NaN"
    out2, weights2 = att(query, _garbage(keys.detach(), mask), mask)
    torch.testing.assert_close(out, out2)
    torch.testing.assert_close(weights, weights2)
    out.sum().backward()
    assert torch.isfinite(keys.grad).all()


def test_co_attention_equals_formula_with_both_masks() -> None:
    torch.manual_seed(5)
    b, t1, t2, d1, d2, d = 4, 5, 7, 3, 6, 4
    co = CoAttention(d1, d2, d)
    x1, x2 = torch.randn(b, t1, d1), torch.randn(b, t2, d2)
    m1, m2 = _mask(b, t1, 5, empty_rows=(2,)), _mask(b, t2, 6, empty_rows=(3,))
    y1, y2, a = co(x1, x2, m1, m2)
    assert y1.shape == (b, t1, d2) and y2.shape == (b, t2, d1) and a.shape == (b, t1, t2)
    for i in range(b):
        r1, r2 = m1[i].nonzero().squeeze(1), m2[i].nonzero().squeeze(1)
        ref_y1, ref_y2 = torch.zeros(t1, d2), torch.zeros(t2, d1)
        if r1.numel() and r2.numel():
            s = (x1[i, r1] @ co.w1.weight.t()) @ (x2[i, r2] @ co.w2.weight.t()).t()
            ai = torch.softmax(s, dim=1)  # over X2's positions
            torch.testing.assert_close(a[i][r1][:, r2], ai, msg=f"sample {i}: A is not the masked softmax")
            ref_y1[r1] = ai @ x2[i, r2]
            ref_y2[r2] = ai.t() @ x1[i, r1]
        torch.testing.assert_close(y1[i], ref_y1, rtol=1e-5, atol=1e-5, msg=f"sample {i}: X1' != A X2")
        torch.testing.assert_close(y2[i], ref_y2, rtol=1e-5, atol=1e-5, msg=f"sample {i}: X2' != A^T X1")
    assert torch.all(a[~m1] == 0) and torch.all(a.transpose(1, 2)[~m2] == 0), "padding must have zero weight"
    g1, g2, ga = co(_garbage(x1, m1), _garbage(x2, m2), m1, m2)
    torch.testing.assert_close((g1, g2, ga), (y1, y2, a))
    assert all(torch.isfinite(z).all() for z in (y1, y2, a))
