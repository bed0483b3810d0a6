"""The native TBE kernels (ops/tbe.py) against FBGEMM's own CPU kernels.

Backward (ops/tbe_backward_kernel.h, nobag row-wise Adagrad): whole FBGEMM table-batched modules trained side
by side with and without it (shared tables, empty bags, repeated ids, int32 / int64 ids, float16 weights,
every weight-decay mode). Forward (ops/tbe_forward_kernel.h, pooled and nobag): the modules' outputs with
and without it (the register-width and any-width paths, sum / mean, per-lookup weights, float16 weights,
float32 / float16 / bfloat16 outputs, outputs large enough to be streamed). The operators' registration
swapped in and out, bad ids, and thread counts."""

from __future__ import annotations

import copy

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from din_torchrec.ops import native, tbe

needs_kernel = pytest.mark.skipif(native.kernels() is None, reason="the native kernels did not build")

tbe_ops = pytest.importorskip("fbgemm_gpu.split_table_batched_embeddings_ops_training")
configs = pytest.importorskip("fbgemm_gpu.split_embedding_configs")


@pytest.fixture(autouse=True)
def _fbgemm_kernel_after_each_test():
    with tbe.registration_restored():
        yield


def _module(
    rows: list[int],
    feature_table_map: list[int],
    dim: int,
    half: bool,
    wd_mode: int,
    seed: int,
    pooling: str = "none",
    output: str = "fp32",
):
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode, PoolingMode
    from fbgemm_gpu.tbe.config.optimizer_config import WeightDecayMode

    torch.manual_seed(seed)
    m = tbe_ops.SplitTableBatchedEmbeddingBagsCodegen(
        [(r, dim, tbe_ops.EmbeddingLocation.HOST, tbe_ops.ComputeDevice.CPU) for r in rows],
        feature_table_map=feature_table_map,
        optimizer=configs.EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        pooling_mode={"none": PoolingMode.NONE, "sum": PoolingMode.SUM, "mean": PoolingMode.MEAN}[pooling],
        output_dtype={"fp32": configs.SparseType.FP32, "fp16": configs.SparseType.FP16}[output],
        bounds_check_mode=BoundsCheckMode.NONE,  # the kernels see bad ids as they come (the module would clamp)
        weights_precision=configs.SparseType.FP16 if half else configs.SparseType.FP32,
        learning_rate=0.3,
        eps=1e-3,
        weight_decay=0.05 if wd_mode else 0.0,
        weight_decay_mode={0: WeightDecayMode.NONE, 1: WeightDecayMode.L2, 2: WeightDecayMode.DECOUPLE}[
            wd_mode
        ],
    )
    with torch.no_grad():
        # Random rows (FBGEMM may start them all equal), so that every lookup's row is told apart, and
        # non-zero momentum, so that its accumulation is checked too.
        m.weights_host.copy_(torch.randn(m.weights_host.shape))
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
        (tbe.install if install else tbe.uninstall)()
        for (ids, off), grad in zip(batches, grads):
            out = model(ids, off)
            out.backward(grad.to(out.dtype))
    tbe.uninstall()
    tol = dict(rtol=1e-3, atol=1e-3) if half else dict(rtol=1e-5, atol=1e-6)
    for a, c in zip(_state(ref), _state(new)):
        torch.testing.assert_close(c, a, **tol)


@needs_kernel
@pytest.mark.parametrize("pooling", ["none", "sum"])
def test_registration_swaps_the_operator_kernels(monkeypatch: pytest.MonkeyPatch, pooling: str) -> None:
    """``install`` routes FBGEMM's operators (as TorchRec's autograd calls them) to the native kernels,
    ``uninstall`` back to FBGEMM's; ``set_enabled(False)`` uninstalls."""
    calls: list[str] = []
    real = native.kernels()
    spied = ("nobag_rowwise_adagrad_backward", "tbe_nobag_forward", "tbe_pooled_forward")

    class Spy:
        def __getattr__(self, name):
            fn = getattr(real, name)
            if name not in spied:
                return fn

            def spy(*args):
                calls.append(name)
                return fn(*args)

            return spy

    monkeypatch.setitem(native._state, "module", Spy())
    m = _module([10], [0], 8, False, 0, 0, pooling=pooling)
    ids, off = torch.tensor([1, 2, 2]), torch.tensor([0, 1, 3])

    def step() -> None:
        m(ids, off).sum().backward()

    tbe.uninstall()
    step()
    assert calls == []
    assert tbe.install() and tbe.installed()
    step()
    # The pooled backward stays FBGEMM's: only the unpooled tables' backward is replaced.
    assert calls == (
        ["tbe_nobag_forward", "nobag_rowwise_adagrad_backward"]
        if pooling == "none"
        else ["tbe_pooled_forward"]
    )
    calls.clear()
    native.set_enabled(False)
    try:
        assert not tbe.installed()
        step()
        assert calls == []
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


def _native_backward_copy(m, grad: torch.Tensor, ids: torch.Tensor, off: torch.Tensor):
    """Weights and momentum after the native backward (lr 0.3, eps 1e-3, weight decay 0.05 in mode 1) on copies of
    ``m``'s, which stay as they were."""
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
    return w, mom


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
            results.append(_native_backward_copy(m, grad, ids, off))
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(results[0][0], m.weights_host.detach())
    for w, mom in results[1:]:
        assert torch.equal(w, results[0][0]) and torch.equal(mom, results[0][1])


# ------------------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------------------


def _forward_both(m, ids, off, per_sample_weights=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's output with FBGEMM's kernel, then with ours."""
    out = []
    for install in (False, True):
        (tbe.install if install else tbe.uninstall)()
        with torch.no_grad():
            out.append(m(ids, off, per_sample_weights=per_sample_weights))
    tbe.uninstall()
    return out[0], out[1]


forward_cases = dict(
    rows=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    extra_features=st.lists(st.integers(0, 2), max_size=3),
    dim=st.sampled_from([4, 12, 16, 20, 32, 48, 64, 96, 128, 256]),  # 16k: register paths; others: any-width
    b=st.integers(1, 6),
    max_len=st.integers(0, 40),  # bags longer than the prefetch distance too
    idtype=st.sampled_from([torch.int32, torch.int64]),
    half=st.booleans(),
    output=st.sampled_from(["fp32", "fp16"]),
    seed=st.integers(0, 2**16),
)


def _forward_inputs(rows, extra_features, b, max_len, idtype, seed):
    fmap = sorted(list(range(len(rows))) + [t % len(rows) for t in extra_features])
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(0, max_len + 1, (len(fmap) * b,), generator=g).tolist()
    ((ids, off),) = _batches([lengths], rows, fmap, idtype, seed)
    return fmap, ids, off


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(**forward_cases)
def test_nobag_forward_equals_fbgemm_kernel(
    rows, extra_features, dim, b, max_len, idtype, half, output, seed
):
    """One row per lookup, copied (and converted) exactly as FBGEMM's kernel does."""
    fmap, ids, off = _forward_inputs(rows, extra_features, b, max_len, idtype, seed)
    m = _module(rows, fmap, dim, half, 0, seed, output=output)
    ref, new = _forward_both(m, ids, off)
    assert new.dtype == ref.dtype and new.shape == ref.shape
    assert torch.equal(new, ref)


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(pooling=st.sampled_from(["sum", "mean"]), weighted=st.booleans(), **forward_cases)
def test_pooled_forward_equals_fbgemm_kernel(
    rows, extra_features, dim, b, max_len, idtype, half, output, seed, pooling, weighted
):
    """Sums (means) of the bags, with and without per-lookup weights, empty bags giving zeros."""
    fmap, ids, off = _forward_inputs(rows, extra_features, b, max_len, idtype, seed)
    m = _module(rows, fmap, dim, half, 0, seed, pooling=pooling, output=output)
    psw = torch.rand(ids.numel(), generator=torch.Generator().manual_seed(seed)) if weighted else None
    ref, new = _forward_both(m, ids, off, psw)
    assert new.dtype == ref.dtype and new.shape == ref.shape
    tol = dict(rtol=2e-3, atol=2e-3) if output == "fp16" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new, ref, **tol)


@needs_kernel
@pytest.mark.parametrize("pooling", ["none", "sum"])
def test_bfloat16_output_is_the_rounded_float32_output(pooling: str) -> None:
    """FBGEMM's CPU kernels have no bfloat16 output; ours give the float32 result rounded once."""
    m = _module([300, 50], [0, 1, 1], 32, False, 0, 3, pooling=pooling)
    ((ids, off),) = _batches([[7, 0, 3, 40, 1, 2] * 2], [300, 50], [0, 1, 1], torch.int64, 3)
    tbe.uninstall()
    with torch.no_grad():
        ref = m(ids, off)
    assert tbe.install()
    mod = native.kernels()
    args = (m.weights_host, m.weights_offsets)
    if pooling == "none":
        out = mod.tbe_nobag_forward(*args, 32, m.hash_size_cumsum, ids, off, configs.SparseType.BF16.as_int())
    else:
        out = mod.tbe_pooled_forward(
            *args,
            m.D_offsets,
            96,
            m.hash_size_cumsum,
            ids,
            off,
            0,
            torch.empty(0),
            configs.SparseType.BF16.as_int(),
        )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=0, atol=0)


@needs_kernel
def test_large_nobag_output_is_streamed_and_equal() -> None:
    """An output over the streaming threshold (16 MiB: 70k rows of 64 floats) takes the streaming-store path;
    it must still equal FBGEMM's."""
    rows = [200_000]
    m = _module(rows, [0], 64, False, 0, 0)
    ((ids, off),) = _batches([[70] * 1000], rows, [0], torch.int64, 0)
    ref, new = _forward_both(m, ids, off)
    assert new.numel() * 4 >= 16 << 20
    assert torch.equal(new, ref)


@needs_kernel
@pytest.mark.parametrize("pooling", ["none", "sum"])
def test_forward_out_of_range_id_names_the_feature(pooling: str) -> None:
    m = _module([10, 5], [0, 1], 16, False, 0, 0, pooling=pooling)
    assert tbe.install()
    with pytest.raises(
        RuntimeError, match=r"feature 1 looked up index 5 \(position 2\), outside its table of 5 rows"
    ):
        m(torch.tensor([3, 4, 5]), torch.tensor([0, 2, 3]))
    with pytest.raises(RuntimeError, match=r"feature 0 looked up index -1 \(position 0\)"):
        m(torch.tensor([-1, 4, 4]), torch.tensor([0, 2, 3]))


@needs_kernel
@pytest.mark.parametrize("pooling", ["none", "sum"])
def test_forward_does_not_depend_on_the_thread_count(pooling: str) -> None:
    """Chunks of at least 8192 lookups per thread: 1, 2 and 3 threads give identical outputs."""
    m = _module([5000, 40], [0, 0, 1], 64, False, 0, 0, pooling=pooling)
    ((ids, off),) = _batches([[30] * 3 * 1024], [5000, 40], [0, 0, 1], torch.int64, 0)
    assert tbe.install()
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                outs.append(m(ids, off))
    finally:
        torch.set_num_threads(threads)
    assert outs[0].abs().sum() > 0
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@needs_kernel
def test_small_and_large_tables_update_rows_identically() -> None:
    """The backward keeps its distinct rows in a direct array when the tables hold at most 4 rows per lookup,
    else in a hash table: the same lookups of the first 300 rows of a 300-row table (direct array) and of a
    1,000,000-row table (hash table) update those rows' weights and momentum bit for bit alike, in the order of
    their lookups; the big table's other rows are untouched."""
    g = torch.Generator().manual_seed(3)
    n = 2000
    ids = (torch.rand(n, generator=g) ** 2 * 300).long()
    off = torch.arange(0, n + 1, 4)
    grad = torch.randn(n, 16, generator=g)
    results = []
    for rows in (300, 1_000_000):
        assert (rows <= 4 * n) == (rows == 300)  # one case on each side of the switch
        m = _module([rows], [0], 16, False, 1, 0)
        with torch.no_grad():
            m.weights_host.zero_()
            m.weights_host[: 300 * 16].copy_(torch.linspace(-1, 1, 300 * 16))
            m.momentum1_host.fill_(0.5)
        results.append(_native_backward_copy(m, grad, ids, off))
    (w_small, m_small), (w_big, m_big) = results
    assert not torch.equal(w_small[: 300 * 16], torch.linspace(-1, 1, 300 * 16))
    assert torch.equal(w_small, w_big[: 300 * 16]) and torch.equal(m_small, m_big[:300])
    assert not w_big[300 * 16 :].any() and bool((m_big[300:] == 0.5).all())
