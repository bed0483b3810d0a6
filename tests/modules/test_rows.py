"""gather_rows equals index_select, values and gradients, for permutations and subsets of distinct rows
(including empty ones and 1-D tensors); a backward that routed a gradient to the wrong row, or failed to
zero the rows that were not taken, would differ from index_select's scatter-add."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from din_torchrec.modules.rows import gather_rows, inverse_index


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 60),
    width=st.sampled_from([(), (1,), (5,), (3, 2)]),
    keep=st.floats(0.0, 1.0),
    permute=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gather_rows_matches_index_select(
    n: int, width: tuple, keep: float, permute: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *width, generator=g, dtype=torch.float64)
    order = torch.randperm(n, generator=g)
    index = order if permute else order[: int(keep * n)]
    weight = torch.randn(index.numel(), *width, generator=g, dtype=torch.float64)

    a = x.clone().requires_grad_()
    out = gather_rows(a, index, inverse_index(index, n))
    (out * weight).sum().backward()
    b = x.clone().requires_grad_()
    ref = b.index_select(0, index)
    (ref * weight).sum().backward()

    assert torch.equal(out, ref)
    assert torch.equal(a.grad, b.grad)


def test_inverse_of_a_permutation_is_its_inverse_permutation() -> None:
    perm = torch.tensor([2, 0, 3, 1])
    inv = inverse_index(perm, 4)
    assert torch.equal(perm.index_select(0, inv), torch.arange(4))
    assert torch.equal(inverse_index(torch.tensor([3, 1]), 5), torch.tensor([2, 1, 2, 0, 2]))


def test_inverse_of_the_wrong_length_is_refused() -> None:
    with pytest.raises(ValueError, match="inverse has 3 entries, x has 4 rows"):
        gather_rows(torch.zeros(4, 2), torch.tensor([0, 1]), torch.zeros(3, dtype=torch.long))
