"""DIEN's auxiliary next-behaviour loss with a sigmoid MLP scorer, as one autograd function.

The loss (:class:`~din_torchrec.modules.interest_evolution.AuxiliaryNextBehaviourLoss`, whose
``forward_unfused`` is the reference this is tested against) scores every real pair ``(h_t, e_{t+1})``
against ``(h_t, e^-_{t+1})`` with the paper's auxiliary net, ``[h, e] -> 100 -> 50 -> 1`` with sigmoids. In
DIEN's training step that net was the largest single cost (a third of a bf16 step on the CPU, N = 26k
behaviours: 2N scored rows of width 100), and half of that was not arithmetic but memory passes that autograd
and autocast add around the matmuls: gathering the pairs' rows (and scattering their gradients back), casts,
padding each matmul's rows to a bucket (see :data:`~din_torchrec.modules.mlp.ROW_BUCKET`) and slicing it off,
zero-filled gradients of those slices. Here:

* **no gathers**: the row of target j (behaviour j, the pair ``(j - 1, j)``) takes the state row j - 1 by a
  shifted contiguous copy. Rows that are no pair's target (each sample's first behaviour) are scored too
  (one per sample) and masked out of the loss, so their gradients are exactly zero;
* **forward and backward together, chunk by chunk** (:class:`_SigmoidMLPPairLoss`): each chunk of target
  rows runs through the net and straight back while its activations are in cache; the first layer is split
  (``W [h, e] + b = (W_h h + b) + W_e e``, the state side once for the positive and the negative row, the
  behaviour side accumulated in place by ``addmm_``: one rounding under bf16, as an ``addmm`` on ``[h, e]``),
  sigmoids run in place, and every chunk has the same row count, so there is no per-layer padding either;
* the backward is written out: ``sigmoid_backward`` per layer, weight gradients as one matmul per chunk
  (summed in float32), the two halves' state gradients added and shifted back.

Measured in DIEN training steps on the CPU, against the gathered-pairs path: +3 % samples/s in bf16, +13 % in
float32 (docs/benchmarks.md, section 7).

The chunk loop is PyTorch ops (:func:`_chunk_loop`: the GPU's path, and the fallback). On the CPU the whole
net runs in C++ instead (``pair_loss_kernel.h``, :func:`native_usable`): blocks of 64 target rows go through
the net and straight back in L1 / L2, the products through oneDNN's BRGEMM micro-kernel, every element-wise
step fused around them, pre-activations, logits and sums in float32; blocks are shared among the threads.
Measured on the op alone (DIEN's sizes, N = 24.5k, one thread): bf16 21.5 -> 17.1 ms, float32 44.9 -> 24.1 ms
against the PyTorch loop; two threads bf16 19.5 -> 10.4 ms. Under autocast both compute in the autocast
dtype with float32 logits, loss and gradient sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from din_torchrec.modules.attention import segment_ids
from din_torchrec.ops import native

#: Target rows per chunk of the PyTorch loop (each chunk scores 2 x CHUNK_ROWS rows: positives and negatives). At 2048 a chunk's
#: widest activation, [4096, 100], is 800 KiB in bf16 (1.6 MiB in float32): it stays in cache from its
#: forward through its backward. Measured in DIEN training steps here: 256 rows 8,315 samples/s, 512 9,660,
#: 1024 10,259, 2048 10,508, 4096 10,180 (bf16; per-chunk op overhead below 1024, cache misses above).
CHUNK_ROWS = 2048


class _SigmoidMLPPairLoss(torch.autograd.Function):
    """Forward *and* backward of the whole loss in :meth:`forward`, chunk by chunk of rows.

    The loss is a sum over rows, so each chunk's gradients follow from its own logits; and every gradient is
    linear in the incoming scalar gradient, so they are computed for a gradient of 1 right away and
    :meth:`backward` only scales them. No ``[2N, 100]`` activation is ever materialised: a chunk's
    intermediates are made, used twice and dropped while still in cache (the unchunked version of this
    function spent a third of its time streaming them through memory). Every chunk has the same row count
    (the last is zero-padded and masked), so each matmul has one shape: under bf16 on the CPU, one oneDNN
    primitive each (see :data:`~din_torchrec.modules.mlp.ROW_BUCKET`).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        states: torch.Tensor,
        behaviours: torch.Tensor,
        negatives: torch.Tensor,
        is_target: torch.Tensor,
        num_pairs: int,
        dtype: torch.dtype,
        chunk: int,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        n, h = states.shape
        dev = states.device
        states_dtype, beh_dtype, neg_dtype = states.dtype, behaviours.dtype, negatives.dtype
        acc = torch.promote_types(dtype, torch.float32)  # logits, loss, gradient sums: float32 under bf16
        weights = [w.to(dtype) for w in params[0::2]]
        biases = [b.to(dtype) for b in params[1::2]]
        scale = 1.0 / max(num_pairs, 1)
        grads = any(ctx.needs_input_grad)

        if native_usable(states, behaviours, weights, dtype):
            # The whole net forward and backward in blocks of rows, in C++ (pair_loss_kernel.h). It pairs target
            # row j with state j - 1 itself and reads float32 inputs directly (rounding them block by block
            # under bf16); its gradients come back in float32, the states' aligned with the states.
            same = states.dtype == behaviours.dtype == negatives.dtype
            if not (same and states.dtype in (dtype, torch.float32)):
                states, behaviours, negatives = (t.to(dtype) for t in (states, behaviours, negatives))
            res = native.kernels().pair_loss_fused(  # type: ignore[union-attr]
                states.contiguous(),
                behaviours.contiguous(),
                negatives.contiguous(),
                is_target.to(torch.float32),
                weights,
                biases,
                scale,
                grads,
                dtype == torch.bfloat16,
            )
            loss = res[0].to(acc)
            if grads:
                k = len(weights)
                g_states, g_x, g_w, g_b = res[1], res[2], res[3 : 3 + k], res[3 + k :]
        else:
            # Chunks of equal size, rounded up to a multiple of 256 rows: a bounded set of matmul shapes (one
            # oneDNN primitive each under bf16) without padding a small batch up to a whole CHUNK_ROWS.
            num_chunks = -(-n // min(chunk, n))
            c = -(-n // num_chunks)
            if chunk >= 256:
                c = min(-(-c // 256) * 256, chunk)
            num_chunks = -(-n // c)
            rows = num_chunks * c
            # Target row j pairs with state j - 1: a zero row in front aligns them (row 0 is masked out
            # anyway); zero rows at the end fill the last chunk.
            hs = states.new_zeros(rows, h, dtype=dtype)
            hs[1:n] = states[: n - 1]
            mask = torch.zeros(rows, dtype=acc, device=dev)
            mask[:n] = is_target
            loss, grad_parts = _chunk_loop(
                hs, behaviours, negatives, mask, weights, biases, n, c, scale, grads, acc
            )
            if grads:
                g_hs, g_x, g_w, g_b = grad_parts
                g_states = torch.zeros_like(g_hs[:n])
                g_states[: n - 1] = g_hs[1:n]  # state j - 1 got the gradient of target row j
        if grads:
            ctx.save_for_backward(g_states, g_x, *g_w, *g_b)
            ctx.meta = (n, states_dtype, beh_dtype, neg_dtype, [t.dtype for t in params])
        return loss * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        n, state_dtype, beh_dtype, neg_dtype, param_dtypes = ctx.meta
        g_states, g_x, *rest = ctx.saved_tensors
        k = len(rest) // 2
        g = grad.to(rest[0].dtype)
        # The loss usually enters the total with weight 1: no pass over the gradients to multiply by it.
        one = grad.device.type == "cpu" and float(grad) == 1.0

        def scaled(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return (t if one else t * g).to(dtype)

        params = []
        for gw, gb, tw, tb in zip(rest[:k], rest[k:], param_dtypes[0::2], param_dtypes[1::2]):
            params += [scaled(gw, tw), scaled(gb, tb)]
        return (
            scaled(g_states, state_dtype),
            scaled(g_x[0, :n], beh_dtype),
            scaled(g_x[1, :n], neg_dtype),
            None,
            None,
            None,
            None,
            *params,
        )


def native_usable(
    states: torch.Tensor, behaviours: torch.Tensor, weights: list[torch.Tensor], dtype: torch.dtype
) -> bool:
    """Whether the native kernel (``pair_loss_kernel.h``) runs this loss: on the CPU in float32 or bf16 (bf16
    with even state, behaviour and hidden widths: the micro-kernel's bf16 right-hand sides pair rows)."""
    if dtype not in (torch.float32, torch.bfloat16) or not native.usable(
        states, (torch.float32, torch.bfloat16)
    ):
        return False
    if dtype == torch.bfloat16:
        widths = [states.shape[1], behaviours.shape[1], *(w.shape[0] for w in weights[:-1])]
        return all(w % 2 == 0 for w in widths)
    return True


def sigmoid_mlp_pair_loss(
    states: torch.Tensor,
    behaviours: torch.Tensor,
    negatives: torch.Tensor,
    lengths: torch.Tensor,
    linears: list[torch.nn.Linear],
    chunk_rows: int | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean over real pairs (j - 1, j) of softplus(-s(h_{j-1}, e_j)) + softplus(s(h_{j-1}, e^-_j))``.

    Args:
        states: ``[N, H]`` jagged interest states.
        behaviours: ``[N, D]`` jagged behaviours (positives), row-aligned with ``states``.
        negatives: ``[N, D]`` one negative per row; row j is the negative of the pair ``(j - 1, j)``.
        lengths: ``[B]`` (0 allowed).
        linears: the scorer's layers ``[H + D -> H1, H1 -> H2, ..., -> 1]``, a sigmoid after each but the last.
        chunk_rows: target rows per chunk (default :data:`CHUNK_ROWS` on the CPU; elsewhere all rows in one
            chunk: on a GPU each chunk's two dozen kernel launches would cost more than the memory it saves).
        segments: ``segment_ids(lengths)`` if the caller has it (``PackedLayout.segments``), else None.

    Returns:
        Scalar loss (0 with a graph when the batch has no pair), float32 (float64 for float64 inputs).
    """
    n = states.shape[0]
    seg = segment_ids(lengths) if segments is None else segments
    is_target = torch.zeros(n, dtype=torch.bool, device=states.device)
    if n > 1:
        is_target[1:] = seg[1:] == seg[:-1]
    num_pairs = int(is_target.sum())
    if torch.is_autocast_enabled(states.device.type):
        dtype = torch.get_autocast_dtype(states.device.type)
    else:
        dtype = torch.promote_types(states.dtype, linears[0].weight.dtype)
    params = [t for layer in linears for t in (layer.weight, layer.bias)]
    if chunk_rows is None:
        chunk_rows = CHUNK_ROWS if states.device.type == "cpu" else max(n, 1)
    with torch.autocast(states.device.type, enabled=False):
        return _SigmoidMLPPairLoss.apply(
            states, behaviours, negatives, is_target, num_pairs, dtype, chunk_rows, *params
        )


def _chunk_loop(
    hs: torch.Tensor,
    behaviours: torch.Tensor,
    negatives: torch.Tensor,
    mask: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    n: int,
    c: int,
    scale: float,
    grads: bool,
    acc: torch.dtype,
) -> tuple[torch.Tensor, tuple | None]:
    """The chunk loop of :class:`_SigmoidMLPPairLoss` in PyTorch ops (the GPU's path, and the CPU's where the
    native kernel ``pair_loss_kernel.h`` does not run): the loss summed over the pairs, and ``(g_hs, g_x, g_w, g_b)`` for a
    gradient of 1 when ``grads``."""
    rows, h = hs.shape
    d = behaviours.shape[1]
    dtype, dev = hs.dtype, hs.device
    k = len(weights)
    w_h, w_e = weights[0][:, :h], weights[0][:, h:]
    num_chunks = rows // c
    x = torch.zeros(2 * c, d, dtype=dtype, device=dev)
    z = torch.empty(2 * c, weights[0].shape[0], dtype=dtype, device=dev)
    loss = torch.zeros((), dtype=acc, device=dev)
    if grads:
        g_hs = torch.empty(rows, h, dtype=dtype, device=dev)
        g_x = torch.empty(2, rows, d, dtype=dtype, device=dev)
        g_w = [torch.zeros(w.shape, dtype=acc, device=dev) for w in weights]
        g_b = [torch.zeros(b.shape, dtype=acc, device=dev) for b in biases]
        dz = torch.zeros(2 * c, 1, dtype=dtype, device=dev)
    for i in range(num_chunks):
        r0, r1 = i * c, min((i + 1) * c, n)
        m = r1 - r0
        x[:m] = behaviours[r0:r1]
        x[c : c + m] = negatives[r0:r1]
        if m < c:
            x[m:c] = 0
            x[c + m :] = 0
        hc = hs[r0 : r0 + c]
        s = torch.addmm(biases[0], hc, w_h.t())
        z[:c] = s
        z[c:] = s
        acts = [x, z.addmm_(x, w_e.t()).sigmoid_()]
        for w, b in zip(weights[1:-1], biases[1:-1]):
            acts.append(torch.addmm(b, acts[-1], w.t()).sigmoid_())
        logits = torch.addmm(biases[-1], acts[-1], weights[-1].t()).squeeze(1).to(acc)
        mc = mask[r0 : r0 + c]
        loss += (F.softplus(-logits[:c]) * mc).sum() + (F.softplus(logits[c:]) * mc).sum()
        if not grads:
            continue
        p = torch.sigmoid(logits)
        dz[:c, 0] = (p[:c] - 1) * mc * scale
        dz[c:, 0] = p[c:] * mc * scale
        grad = dz
        for j in range(k - 1, 0, -1):
            g_w[j] += grad.t().mm(acts[j])
            g_b[j] += grad.sum(0, dtype=acc)
            grad = torch.ops.aten.sigmoid_backward(grad.mm(weights[j]), acts[j])
        ds = grad[:c] + grad[c:]
        g_w[0][:, :h] += ds.t().mm(hc)
        g_w[0][:, h:] += grad.t().mm(x)
        g_b[0] += ds.sum(0, dtype=acc)
        torch.mm(ds, w_h, out=g_hs[r0 : r0 + c])
        dx = grad.mm(w_e)
        g_x[0, r0 : r0 + c] = dx[:c]
        g_x[1, r0 : r0 + c] = dx[c:]
    return loss, ((g_hs, g_x, g_w, g_b) if grads else None)
