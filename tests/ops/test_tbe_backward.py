"""The native nobag row-wise Adagrad backward (ops/tbe_backward_kernel.h) against FBGEMM's own CPU kernel:
whole FBGEMM table-batched modules trained side by side with and without it (shared tables, empty bags,
repeated ids, int32 / int64 ids, float16 weights, both weight-decay modes), the operator's registration
swapped in and out, and bad ids."""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from din_torchrec.ops import native, tbe_backward

needs_kernel = pytest.mark.skipif(native.kernels() is None, reason="the native kernels did not build")

tbe_ops = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_training")
configs = pytest.importorskip("fbgemm_gpu.split_embedding_configs")


@pytest.fixture(autouse=True)
def _fbgemm_kernel_after_each_test():
    was = tbe_backward.installed()
    yield
    (tbe_backward.install if was else tbe_backward.uninstall)()


def _module(rows: list[int], feature_table_map: list[int], dim: int, half: bool, wd_mode: int, seed: int):
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    torch.manual_seed(seed)
    m = tbe_ops.SplitTableBatchedEmbeddingBagsCodegen(
        [(r, dim, tbe_ops.EmbeddingLocation.HOST, tbe_ops.ComputeDevice.CPU) for r in rows],
        feature_table_map=feature_table_map,
        optimizer=configs.EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        pooling_mode=PoolingMode.NONE,
        weights_precision=configs.SparseType.FP16 if half else configs.SparseType.FP32,
        learning_rate=0.3,
        eps=1e-3,
        weight_decay=0.05 if wd_mode else 0.0,
        weight_decay_mode={0: WeightDecayMode.NONE, 1: WeightDecayMode.L2, 2: WeightDecayMode.DECOUPLE}[
            wd_mode
        ],
    )
    with torch.no_grad():  # non-zero momentum, so that its accumulation is checked too
        for state in m.split_optimizer_states():
            state[0].uniform_(0.0, 2.0)
    return m


def _state(m) -> list[torch.Tensor]:
    return [w.detach().float().clone() for w in m.split_embedding_weights()] + [
        s[0].detach().clone() for s in m.split_optimizer_states()
    ]


def _batches(draw_lengths: list[list[int]], rows: list[int], fmap: list[int], idtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for lengths in draw_lengths:  # lengths: T * B, feature-major
        b = len(lengths) // len(fmap)
        ids = []
        for f, t in enumerate(fmap):
            n = sum(lengths[f * b : (f + 1) * b])
            # skewed: repeats within a feature and across features of one table
            ids.append((torch.rand(n, generator=g) ** 3 * rows[t]).long().clamp_(max=rows[t] - 1))
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        offsets[1:] = torch.tensor(lengths).cumsum(0)
        out.append((torch.cat(ids).to(idtype), offsets.to(idtype)))
    return out


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    rows=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    extra_features=st.lists(st.integers(0, 2), max_size=3),
    dim=st.sampled_from([4, 12, 16, 20]),
    b=st.integers(1, 6),
    max_len=st.integers(0, 5),
    steps=st.integers(1, 3),
    idtype=st.sampled_from([torch.int32, torch.int64]),
    half=st.booleans(),
    wd_mode=st.sampled_from([0, 1, 2]),
    seed=st.integers(0, 2**16),
)
def test_training_equals_fbgemm_kernel(
    rows, extra_features, dim, b, max_len, steps, idtype, half, wd_mode, seed
):
    """Weights and momentum after a few steps of forward + backward: FBGEMM's kernel vs ours, on tables
    shared by several features (``feature_table_map`` repeats), empty bags and repeated ids."""
    fmap = sorted(list(range(len(rows))) + [t % len(rows) for t in extra_features])
    ref = _module(rows, fmap, dim, half, wd_mode, seed)
    new = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed + 1)
    lengths = [torch.randint(0, max_len + 1, (len(fmap) * b,), generator=g).tolist() for _ in range(steps)]
    batches = _batches(lengths, rows, fmap, idtype, seed)
    grads = [torch.randn(int(off[-1]), dim, generator=g) for _, off in batches]
    for model, install in ((ref, False), (new, True)):
        (tbe_backward.install if install else tbe_backward.uninstall)()
        for (ids, off), grad in zip(batches, grads):
            out = model(ids, off)
            out.backward(grad.to(out.dtype))
    tbe_backward.uninstall()
    tol = dict(rtol=1e-3, atol=1e-3) if half else dict(rtol=1e-5, atol=1e-6)
    for a, c in zip(_state(ref), _state(new)):
        torch.testing.assert_close(c, a, **tol)


@needs_kernel
def test_registration_swaps_the_operator_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """``install`` routes FBGEMM's operator (as TorchRec's autograd calls it) to the native kernel,
    ``uninstall`` back to FBGEMM's; ``set_enabled(False)`` uninstalls."""
    calls = []
    real = native.kernels()

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def nobag_rowwise_adagrad_backward(self, *args):
            calls.append(1)
            return real.nobag_rowwise_adagrad_backward(*args)

    monkeypatch.setitem(native._state, "module", Spy())
    m = _module([10], [0], 8, False, 0, 0)
    ids, off = torch.tensor([1, 2, 2]), torch.tensor([0, 1, 3])

    def step() -> None:
        m(ids, off).sum().backward()

    tbe_backward.uninstall()
    step()
    assert calls == []
    assert tbe_backward.install() and tbe_backward.installed()
    step()
    assert calls == [1]
    native.set_enabled(False)
    try:
        assert not tbe_backward.installed()
        step()
        assert calls == [1]
    finally:
        native.set_enabled(True)


@needs_kernel
def test_out_of_range_id_names_the_feature() -> None:
    m = _module([10, 5], [0, 1], 4, False, 0, 0)
    weights_before = _state(m)
    args = dict(
        grad_output=torch.ones(2, 4),
        host_weights=m.weights_host,
        weights_offsets=m.weights_offsets,
        D=4,
        hash_size_cumsum=m.hash_size_cumsum,
        indices=torch.tensor([3, 5]),  # feature 1 has 5 rows: id 5 is outside
        offsets=torch.tensor([0, 1, 2]),
        momentum1_host=m.momentum1_host,
        momentum1_offsets=m.momentum1_offsets,
    )
    with pytest.raises(RuntimeError, match=r"feature 1 looked up index 5 .* outside its table of 5 rows"):
        native.kernels().nobag_rowwise_adagrad_backward(*args.values(), 0.1, 1e-8, 0.0, 0)
    for a, c in zip(weights_before, _state(m)):
        torch.testing.assert_close(c, a)  # checked before any update


@needs_kernel
def test_result_does_not_depend_on_the_thread_count() -> None:
    """Enough lookups for one hash partition per thread: 1, 2 and 3 threads give bit-identical weights and
    momentum (each row's gradient is summed over its lookups in the same order)."""
    m = _module([5000, 40], [0, 0, 1], 16, False, 1, 0)
    ((ids, off),) = _batches([[40] * 3 * 1024], [5000, 40], [0, 0, 1], torch.int64, 0)
    grad = torch.randn(int(off[-1]), 16, generator=torch.Generator().manual_seed(1))
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            w, mom = m.weights_host.detach().clone(), m.momentum1_host.detach().clone()
            native.kernels().nobag_rowwise_adagrad_backward(
                grad,
                w,
                m.weights_offsets,
                16,
                m.hash_size_cumsum,
                ids,
                off,
                mom,
                m.momentum1_offsets,
                0.3,
                1e-3,
                0.05,
                1,
            )
            results.append((w, mom))
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(results[0][0], m.weights_host.detach())
    for w, mom in results[1:]:
        assert torch.equal(w, results[0][0]) and torch.equal(mom, results[0][1])
