"""Mini-batch-aware regularization against a hand-computed reference on a tiny table."""

import numpy as np
import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from din_torchrec.ops import native
from din_torchrec.training.regularization import kjt_mba_coefficients, mba_coefficients, mba_penalty

FREQ = {"item": np.array([5, 2, 4, 1, 10, 3], dtype=np.int64)}
TABLE_OF = {"cand": "item", "hist": "item"}


def _tiny() -> tuple[EmbeddingCollection, KeyedJaggedTensor]:
    torch.manual_seed(0)
    ec = EmbeddingCollection(
        tables=[
            EmbeddingConfig(name="item", embedding_dim=4, num_embeddings=6, feature_names=["cand", "hist"])
        ]
    )
    # cand: [1], [4]; hist: [1, 2, 1], [2]  -> id 1 appears 3x, id 2 twice, id 4 once; ids 0, 3, 5 absent
    kjt = KeyedJaggedTensor.from_lengths_sync(
        ["cand", "hist"], torch.tensor([1, 4, 1, 2, 1, 2]), torch.tensor([1, 1, 3, 1])
    )
    return ec, kjt


@pytest.mark.parametrize("mode", ["count", "indicator"])
def test_penalty_equals_hand_computed_sum_over_touched_rows(mode: str) -> None:
    ec, kjt = _tiny()
    w = ec.embeddings["item"].weight.detach()
    coeff = kjt_mba_coefficients(kjt, TABLE_OF, FREQ, mode)
    out = ec(kjt)
    penalty = mba_penalty({k: out[k].values() for k in ("cand", "hist")}, coeff)
    counts = {1: 3, 2: 2, 4: 1}
    expected = sum(
        (counts[j] if mode == "count" else 1) / FREQ["item"][j] * float(w[j].pow(2).sum()) for j in counts
    )
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("mode", ["count", "indicator"])
def test_gradient_reaches_exactly_the_touched_rows(mode: str) -> None:
    ec, kjt = _tiny()
    weight = ec.embeddings["item"].weight
    out = ec(kjt)
    penalty = mba_penalty(
        {k: out[k].values() for k in ("cand", "hist")}, kjt_mba_coefficients(kjt, TABLE_OF, FREQ, mode)
    )
    penalty.backward()
    grad = weight.grad
    for j in (0, 3, 5):
        assert torch.all(grad[j] == 0), f"row {j} was not in the batch but got a gradient"
    counts = {1: 3, 2: 2, 4: 1}
    for j, a in counts.items():
        scale = (a if mode == "count" else 1) / FREQ["item"][j]
        torch.testing.assert_close(grad[j], 2 * scale * weight.detach()[j])


def test_indicator_coefficients_sum_to_one_over_n_per_row() -> None:
    ids = {"cand": np.array([3, 3]), "hist": np.array([3, 0, 5, 5, 5])}
    coeff = mba_coefficients(ids, TABLE_OF, FREQ, "indicator")
    all_ids = np.concatenate([ids["cand"], ids["hist"]])
    all_c = np.concatenate([coeff["cand"], coeff["hist"]])
    for j in np.unique(all_ids):
        assert all_c[all_ids == j].sum() == pytest.approx(1.0 / FREQ["item"][j])


def test_zero_frequency_is_treated_as_one_and_bad_mode_is_refused() -> None:
    freq = {"item": np.array([0, 0, 2])}
    c = mba_coefficients({"cand": np.array([0, 2])}, {"cand": "item"}, freq, "count")
    np.testing.assert_allclose(c["cand"], [1.0, 0.5])
    with pytest.raises(ValueError, match="indicator"):
        mba_coefficients({"cand": np.array([0])}, {"cand": "item"}, freq, "presence")


def test_fused_optimizer_leaves_untouched_rows_unchanged() -> None:
    """Under DistributedModelParallel with a fused SGD, only touched rows move, by lr * gradient."""
    from din_torchrec.config import ExperimentConfig, SequenceTableConfig
    from din_torchrec.distributed.env import init_distributed
    from din_torchrec.distributed.sharding import shard_model

    cfg = ExperimentConfig()
    cfg.features.embedding_dim = 4
    cfg.features.sequence = [SequenceTableConfig("item", 6, "cand", "hist")]
    cfg.features.profile = []
    cfg.training.sparse_optimizer = "sgd"
    cfg.training.lr_sparse = 0.5
    env = init_distributed("gloo")
    ec, kjt = _tiny()

    class OnlyEC(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ec = ec

        def forward(self, k: KeyedJaggedTensor) -> dict:
            out = self.ec(k)
            return {key: out[key].values() for key in ("cand", "hist")}

    before = ec.embeddings["item"].weight.detach().clone()
    dmp = shard_model(OnlyEC(), env, cfg.features, cfg.training, batch_size=2)
    coeff = kjt_mba_coefficients(kjt, TABLE_OF, FREQ, "count")
    mba_penalty(dmp(kjt), coeff).backward()
    after = dmp.state_dict()["ec.embeddings.item.weight"].local_shards()[0].tensor
    counts = {1: 3, 2: 2, 4: 1}
    for j in range(6):
        if j in counts:
            expected = before[j] - 0.5 * 2 * counts[j] / FREQ["item"][j] * before[j]
            torch.testing.assert_close(after[j], expected)
        else:
            assert torch.equal(after[j], before[j]), f"untouched row {j} changed"


def test_penalty_gradient_matches_autograd_of_the_formula() -> None:
    # The written-out backward against autograd's own on sum_i c_i ||v_i||^2 (float64 gradcheck, and float32 /
    # bf16 rows against the float64 formula).
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(37, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    c = torch.rand(37, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: mba_penalty({"k": x}, {"k": c}), (v,))
    for dtype in (torch.float32, torch.bfloat16):
        x = v.detach().to(dtype).requires_grad_()
        got = mba_penalty({"k": x}, {"k": c.float()})
        (g,) = torch.autograd.grad(got, x)
        ref_x = x.detach().double().requires_grad_()
        want = ((ref_x * ref_x).sum(-1) * c.float().double()).sum()
        (want_g,) = torch.autograd.grad(want, ref_x)
        assert got.dtype == torch.float32 and g.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
        tol = 1e-5 if dtype == torch.float32 else 2**-7
        torch.testing.assert_close(g.double(), want_g, rtol=tol, atol=1e-6)


@pytest.mark.skipif(native.kernels() is None, reason="the native kernels did not build")
def test_native_penalty_over_all_keys_equals_the_float64_formula() -> None:
    """Float32 CPU keys take one native call each way (ops/regularization_kernel.h): the penalty and every key's
    gradient as the float64 formula, on a key longer than a chunk, an empty key, and a column slice of a pooled
    ``[B, 3 D]`` output (rows with a stride); 1 and 3 threads give the same bits."""
    gen = torch.Generator().manual_seed(4)
    pooled = torch.randn(50, 12, generator=gen, requires_grad=True)
    keys = {
        "hist": torch.randn(5000, 16, generator=gen, requires_grad=True),
        "empty": torch.randn(0, 16, generator=gen, requires_grad=True),
        "user": pooled[:, 4:8],
    }
    coeff = {k: torch.rand(v.shape[0], generator=gen) for k, v in keys.items()}
    leaves = [keys["hist"], keys["empty"], pooled]
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            got = mba_penalty(keys, coeff)
            assert got.grad_fn.name().startswith("_NativeWeightedSquaredNorms")
            runs.append((got, torch.autograd.grad(got * 3.0, leaves)))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(runs[0][0], runs[1][0]) and all(
        torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1])
    )
    got, grads = runs[0]
    ref = [t.detach().double().requires_grad_() for t in leaves]
    ref_keys = {"hist": ref[0], "empty": ref[1], "user": ref[2][:, 4:8]}
    want = sum(((v * v).sum(-1) * coeff[k].double()).sum() for k, v in ref_keys.items())
    want_grads = torch.autograd.grad(want * 3.0, ref)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)
    assert torch.all(grads[2][:, :4] == 0) and torch.all(grads[2][:, 8:] == 0)
