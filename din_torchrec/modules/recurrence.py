"""Gated recurrences over packed jagged sequences with a hand-written backward (backpropagation through time).

DIEN runs two recurrences per batch: the interest extractor's GRU and the interest evolution's AUGRU. Each step
is a ``[b_t, H] x [H, G H]`` matmul and a dozen element-wise ops on small tensors. :class:`PackedRecurrence`
runs the whole loop as one autograd node (no graph of ~25 nodes per step, no zero-filled gradient copies of
slices, the recurrent weight gradient as one matmul); measured, that is about as fast as a carefully written
autograd loop over the same packed layout (0.8-1.1x, docs/benchmarks.md section 3): the per-step work itself,
not autograd, is the cost. The speed-ups over the references come from the packed layout (no padded steps).

* forward: per step, one ``addmm`` and the gate arithmetic, writing states, gates and ``U_n h`` into packed
  ``[N, .]`` buffers (saved for the backward; no graph);
* backward: per step, the gate derivatives with ATen's fused ``sigmoid_backward`` / ``tanh_backward`` and one
  ``addmm`` for the gradient flowing to the previous state; the weight gradient ``dU = sum_t dhh_t^T h_{t-1}`` is
  **one** ``[G H, N] x [N, H]`` matmul after the loop instead of one per step.

Rows are in the packed layout of :class:`~din_torchrec.modules.interest_evolution.PackedLayout` (time-major,
samples ranked by length, longest first), so the ``b_t`` samples active at step ``t`` are the first ``b_t``
ranks and their previous states are a prefix of the previous step's rows.

Cells (``G`` gates per state unit; ``x`` already projected and biased, ``hh = U h (+ b_hh)``):

==========  ==========  ======================================================================================
mode        gate rows   update (``k`` is the weight of the old state: ``h' = k h + (1 - k) n``)
==========  ==========  ======================================================================================
``gru``     r, z, n     ``torch.nn.GRU``: ``n = tanh(x_n + r (U_n h + b_hn))``, ``k = z``
``augru``   u, r, n     DIEN's AUGRU: ``n = tanh(x_n + r U_n h)``, ``k = 1 - a u`` (``a`` the attention)
``ugru``    u, r, n     the same GRU without attention (``k = 1 - u``; AIGRU after scaling its input)
``agru``    r, n        DIEN's AGRU: the attention replaces the update gate, ``k = 1 - a``
==========  ==========  ======================================================================================

On the CPU (float32, or a bfloat16 input under mixed precision; the native kernels built:
:mod:`din_torchrec.ops.native`) the same algorithm runs in C++ (``ops/recurrence_kernel.h``,
:class:`NativePackedRecurrence`): one small matmul (oneDNN's BRGEMM micro-kernel) and one fused loop per step
instead of ~10 ATen calls on tensors of a few KB, whose dispatch was most of a step's time; with several
threads each step's rows are split among them. Tests compare it with :class:`PackedRecurrence` and with the autograd references.

The autograd loops these replace stay in the tests as references (``InterestEvolution.forward_reference`` and
the cells' ``step``, ``InterestExtractor.forward_packed``): values and gradients are compared there, on random
jagged batches with empty and length-1 histories.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from din_torchrec.ops import native

MODES = ("gru", "augru", "ugru", "agru")


def _num_sigmoid_gates(mode: str) -> int:
    return 1 if mode == "agru" else 2


def _tanh_(x: torch.Tensor) -> torch.Tensor:
    """``tanh`` in place as ``2 sigmoid(2 x) - 1``: ATen's CPU ``tanh`` ran at 36 us on a ``[500, 32]`` fp32
    step here, these three in-place ops at about 15 us (its ``sigmoid`` is vectorised, its ``tanh`` was not).
    The absolute error stays at rounding level (|tanh| <= 1); the backward uses ``1 - n^2`` either way."""
    if x.device.type != "cpu":
        return x.tanh_()
    # 0-dim tensors, not Python numbers: each number operand was converted to a tensor per call (3 us).
    two = x.new_full((), 2.0)
    return torch.addcmul(x.new_full((), -1.0), x.mul_(two).sigmoid_(), two, out=x)


def _reset_and_keep(
    mode: str, s: torch.Tensor, a: torch.Tensor | None, hidden: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reset gate ``r`` and the old-state weight ``k`` of one step, from its sigmoid gates ``s [b, ns H]``
    and attention ``a [b, 1]`` (``augru`` / ``agru``); see the module table."""
    if mode == "gru":  # gates r, z
        return s[:, :hidden], s[:, hidden:]
    if mode == "agru":  # gate r
        return s, 1 - a  # type: ignore[operator]
    u, r = s[:, :hidden], s[:, hidden:]  # gates u, r
    return r, (1 - u) if mode == "ugru" else torch.addcmul(torch.ones_like(u), u, a, value=-1)  # type: ignore[arg-type]


def _product_operand(t: torch.Tensor, bf16: bool) -> torch.Tensor:
    """``t`` as a per-step product's operand: rounded to bf16 (and widened back: the products of bf16 values
    are exact in float32, so a float32 matmul on them is the bf16 product with float32 sums) or as it is."""
    return t.bfloat16().float() if bf16 else t


class PackedRecurrence(torch.autograd.Function):
    """``states = PackedRecurrence.apply(x, att, weight_hh, bias_hh, steps, mode[, input_bias])``.

    Args (of ``apply``):
        x: ``[N, G H]`` packed input pre-activations (``W x + b``), gate rows as in the module table.
        att: ``[N]`` packed attention (``augru`` / ``agru``), else None.
        weight_hh: ``[G H, H]``.
        bias_hh: ``[G H]`` (``gru`` only), else None.
        steps: active samples per step (``PackedLayout.steps``), non-increasing, summing to N.
        mode: one of :data:`MODES`.
        input_bias: ``[G H]`` added to ``x`` (optional; its gradient is the column sum of ``x``'s).
        bf16_products: the per-step products (``U h``, the gradient through ``U h``, ``U``'s gradient) on
            operands rounded to bf16, sums in float32 -- the native kernel's arithmetic under bf16 autocast, of
            which this is the reference (default False: float32 operands).

    Returns:
        ``[N, H]`` packed states, row ``i`` the state after the step of row ``i`` (zero initial state).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        att: torch.Tensor | None,
        weight_hh: torch.Tensor,
        bias_hh: torch.Tensor | None,
        steps: list[int],
        mode: str,
        input_bias: torch.Tensor | None = None,
        bf16_products: bool = False,
    ) -> torch.Tensor:
        ctx.has_input_bias = input_bias is not None
        ctx.bf16_products = bf16_products
        if input_bias is not None:
            x = x + input_bias
        n_rows, hidden = x.shape[0], weight_hh.shape[1]
        ns = _num_sigmoid_gates(mode)
        g = (ns + 1) * hidden
        wt = _product_operand(weight_hh, bf16_products).t()
        out = x.new_empty(n_rows, hidden)
        sig = x.new_empty(n_rows, ns * hidden)  # sigmoid gates
        cand = x.new_empty(n_rows, hidden)  # n
        hh_all = x.new_empty(n_rows, g)  # U h (+ b_hh), written in place by addmm
        h = x.new_zeros(steps[0] if steps else 0, hidden)
        start = 0
        for b in steps:
            rows = slice(start, start + b)
            hp = h[:b]
            hh = hh_all[rows]
            hp_op = _product_operand(hp, bf16_products)
            if bias_hh is not None:
                torch.addmm(bias_hh, hp_op, wt, out=hh)
            else:
                torch.mm(hp_op, wt, out=hh)
            xs = x[rows]
            s = torch.add(xs[:, : ns * hidden], hh[:, : ns * hidden], out=sig[rows]).sigmoid_()
            a = att[rows].unsqueeze(1) if att is not None else None
            r, k = _reset_and_keep(mode, s, a, hidden)
            n = _tanh_(torch.addcmul(xs[:, ns * hidden :], r, hh[:, ns * hidden :], out=cand[rows]))
            h = torch.addcmul(n, k, hp - n, out=out[rows])
            start += b
        ctx.steps = list(steps)
        ctx.mode = mode
        ctx.has_bias = bias_hh is not None
        ctx.save_for_backward(att, weight_hh, out, sig, cand, hh_all[:, ns * hidden :])
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        att, weight_hh, out, sig, cand, hh_n = ctx.saved_tensors
        steps: list[int] = ctx.steps
        mode: str = ctx.mode
        bf16_products: bool = ctx.bf16_products
        w_op = _product_operand(weight_hh, bf16_products)
        n_rows, hidden = out.shape
        ns = _num_sigmoid_gates(mode)
        g = (ns + 1) * hidden
        # d loss / d h of every row: the output's gradient, plus (added below, step by step from the last)
        # what flows back from the next step through U h and through the k h term.
        dh_all = grad_out.clone(memory_format=torch.contiguous_format)
        dx = out.new_empty(n_rows, g)  # d loss / d x; its sigmoid-gate columns are also d loss / d(U h)
        dhh_n = out.new_empty(n_rows, hidden)  # d loss / d(U_n h): differs from d x_n by the factor r
        datt = out.new_zeros(n_rows) if att is not None else None
        starts = [0]
        for b in steps[:-1]:
            starts.append(starts[-1] + b)
        for t in range(len(steps) - 1, -1, -1):
            b, start = steps[t], starts[t]
            rows = slice(start, start + b)
            dh = dh_all[rows]
            s = sig[rows]
            n = cand[rows]
            hp = out[starts[t - 1] : starts[t - 1] + b] if t > 0 else torch.zeros_like(n)
            a = att[rows].unsqueeze(1) if att is not None else None
            r, k = _reset_and_keep(mode, s, a, hidden)
            dk = dh * (hp - n)  # d h' / d k = h - n
            dgn = torch.ops.aten.tanh_backward(torch.addcmul(dh, dh, k, value=-1), n)  # d n = dh (1 - k)
            dx[rows, ns * hidden :] = dgn
            dhn = torch.mul(dgn, r, out=dhh_n[rows])
            dr = dgn * hh_n[rows]
            if mode == "gru":
                dsig = torch.cat([dr, dk], dim=1)
            elif mode == "augru":
                datt[rows] = -(dk * s[:, :hidden]).sum(1)  # type: ignore[index]  # k = 1 - a u
                dsig = torch.cat([-dk * a, dr], dim=1)
            elif mode == "ugru":
                dsig = torch.cat([-dk, dr], dim=1)
            else:
                datt[rows] = -dk.sum(1)  # type: ignore[index]
                dsig = dr
            dgs = torch.ops.aten.sigmoid_backward(dsig, s)
            dx[rows, : ns * hidden] = dgs
            if t > 0:
                prev = dh_all[starts[t - 1] : starts[t - 1] + b]
                prev.addcmul_(dh, k)  # through h' = k h + ...
                dhh_t = _product_operand(torch.cat([dgs, dhn], dim=1), bf16_products)
                prev.addmm_(dhh_t, w_op)  # through U h
        # The state each row's step started from: row i of step t >= 1 continues row i - steps[t - 1].
        lengths = torch.tensor(steps[1:], dtype=torch.long, device=out.device)
        shift = torch.repeat_interleave(
            torch.tensor(steps[:-1], dtype=torch.long, device=out.device), lengths
        )
        first = steps[0] if steps else 0
        h_prev_rows = torch.arange(first, n_rows, device=out.device) - shift
        dhh = torch.cat([dx[:, : ns * hidden], dhh_n], dim=1)  # d loss / d(U h) of every row
        # step-0 rows start from zeros: no term
        dweight = _product_operand(dhh[first:], bf16_products).t() @ _product_operand(
            out.index_select(0, h_prev_rows), bf16_products
        )
        dbias = dhh.sum(0) if ctx.has_bias else None
        return dx, datt, dweight, dbias, None, None, (dx.sum(0) if ctx.has_input_bias else None), None


def _kernel_backward(
    ctx, grad_out: torch.Tensor, saved: tuple, bf16_x: bool, final_only: bool = False
) -> list[torch.Tensor]:
    """The C++ recurrence backward for :class:`NativePackedRecurrence` / :class:`NativeProjectedRecurrence`:
    ``saved = (att, weight_hh, out, sig, cand, hh_n)``; ``[dx, datt, dweight_hh, dbias_hh, dinput_bias]``, dx
    in bf16 when ``bf16_x``. ``final_only``: ``grad_out [B0, H]`` is the gradient of each sequence's last state
    by rank, every other state's output gradient zero."""
    mod = native.kernels()
    assert mod is not None
    return mod.recurrence_backward(
        grad_out.float().contiguous(),
        *saved,
        ctx.steps,
        ctx.code,
        ctx.has_bias,
        ctx.has_input_bias,
        bf16_x,
        ctx.bf16_products,
        final_only,
    )


class NativePackedRecurrence(torch.autograd.Function):
    """:class:`PackedRecurrence` through the C++ kernel (same arguments and result; CPU tensors, float32 but
    for ``x``, which may also be bfloat16: the kernel widens it as it reads it and returns its gradient in
    bfloat16, so mixed precision needs no float32 copy of ``x`` nor of its gradient; ``bf16_products`` as
    there, through the micro-kernel's bf16 path)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        att: torch.Tensor | None,
        weight_hh: torch.Tensor,
        bias_hh: torch.Tensor | None,
        steps: list[int],
        mode: str,
        input_bias: torch.Tensor | None = None,
        bf16_products: bool = False,
    ) -> torch.Tensor:
        mod = native.kernels()
        assert mod is not None
        code = MODES.index(mode)
        att_c = None if att is None else att.contiguous()
        w = weight_hh.contiguous()
        out, sig, cand, hh_n = mod.recurrence_forward(
            x.contiguous(),
            att_c,
            w,
            None if bias_hh is None else bias_hh.contiguous(),
            None if input_bias is None else input_bias.contiguous(),
            list(steps),
            code,
            bf16_products,
            None,
            None,
        )
        ctx.steps, ctx.code, ctx.has_bias = list(steps), code, bias_hh is not None
        ctx.bf16_products = bf16_products
        ctx.has_input_bias, ctx.bf16_x = input_bias is not None, x.dtype == torch.bfloat16
        ctx.save_for_backward(att_c, w, out, sig, cand, hh_n)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        att = ctx.saved_tensors[0]
        dx, datt, dweight, dbias, dinput_bias = _kernel_backward(ctx, grad_out, ctx.saved_tensors, ctx.bf16_x)
        return (
            dx,
            (datt if att is not None else None),
            dweight,
            (dbias if ctx.has_bias else None),
            None,
            None,
            (dinput_bias if ctx.has_input_bias else None),
            None,
        )


def _recurrence_function(x: torch.Tensor) -> type[torch.autograd.Function]:
    """The native kernel for float32 (and, see :func:`packed_recurrence`, bfloat16) CPU inputs."""
    return NativePackedRecurrence if native.usable(x, (torch.float32, torch.bfloat16)) else PackedRecurrence


def _bf16_products(device_type: str, *sizes: int) -> bool:
    """Whether the per-step products take bf16 operands: on the CPU under bf16 autocast, with every product
    width in ``sizes`` even (the micro-kernel's bf16 right-hand sides pair rows)."""
    return (
        device_type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and all(n % 2 == 0 for n in sizes)
    )


def _check_arguments(
    x_shape: tuple[int, ...],
    att: torch.Tensor | None,
    weight_hh: torch.Tensor,
    bias_hh: torch.Tensor | None,
    steps: list[int],
    mode: str,
    input_bias: torch.Tensor | None,
) -> None:
    """:func:`packed_recurrence`'s argument checks (``x_shape``: the projected input's, ``[N, G]``)."""
    if mode not in MODES:
        raise ValueError(f"packed_recurrence: mode must be one of {MODES}, got {mode!r}")
    hidden = weight_hh.shape[1]
    gates = (_num_sigmoid_gates(mode) + 1) * hidden
    if len(x_shape) != 2 or x_shape[1] != gates or weight_hh.shape[0] != gates:
        raise ValueError(
            f"packed_recurrence ({mode}): expected x [N, {gates}] and weight_hh [{gates}, {hidden}], "
            f"got {tuple(x_shape)} and {tuple(weight_hh.shape)}"
        )
    if input_bias is not None and input_bias.shape != (gates,):
        raise ValueError(
            f"packed_recurrence ({mode}): input_bias must be [{gates}], got {tuple(input_bias.shape)}"
        )
    if (att is None) != (mode not in ("augru", "agru")):
        raise ValueError(f"packed_recurrence ({mode}): att is {'required' if att is None else 'not used'}")
    if (bias_hh is None) != (mode != "gru"):
        raise ValueError(
            f"packed_recurrence ({mode}): bias_hh is {'required' if bias_hh is None else 'not used'}"
        )
    if sum(steps) != x_shape[0]:
        raise ValueError(f"packed_recurrence: steps sum to {sum(steps)}, x has {x_shape[0]} rows")


def packed_recurrence(
    x: torch.Tensor,
    att: torch.Tensor | None,
    weight_hh: torch.Tensor,
    bias_hh: torch.Tensor | None,
    steps: list[int],
    mode: str,
    input_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """:class:`PackedRecurrence` with its arguments checked; ``[N, G H] -> [N, H]`` (see there).

    ``input_bias [G H]`` is added to ``x`` inside the recurrence (no ``x + b`` pass over all N rows). Under
    mixed precision the recurrence runs in float32 and returns float32 states; the native kernel reads a
    bfloat16 ``x`` as it is (widening it row by row), everything else is cast to float32 first. Under bf16
    autocast on the CPU its per-step products take bf16 operands with float32 sums (``bf16_products``; an even
    hidden size), as autocast's own GRU does.
    """
    _check_arguments(tuple(x.shape), att, weight_hh, bias_hh, steps, mode, input_bias)
    hidden = weight_hh.shape[1]
    if x.shape[0] == 0:
        out = x.new_zeros(0, hidden) + 0 * weight_hh.sum()
        return out if input_bias is None else out + 0 * input_bias.sum()
    if x.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled(x.device.type):
        # The recurrence accumulates over up to T steps: it runs in float32 under mixed precision (the
        # buffers are allocated in float32, so autocast must not change the dtype of the ops inside).
        bf16_products = _bf16_products(x.device.type, hidden)
        if not (x.dtype == torch.bfloat16 and _recurrence_function(x) is NativePackedRecurrence):
            x = x.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _recurrence_function(x).apply(
                x,
                None if att is None else att.float(),
                weight_hh.float(),
                None if bias_hh is None else bias_hh.float(),
                steps,
                mode,
                None if input_bias is None else input_bias.float(),
                bf16_products,
            )
    return _recurrence_function(x).apply(x, att, weight_hh, bias_hh, steps, mode, input_bias)


class NativeProjectedRecurrence(torch.autograd.Function):
    """The recurrence with its input projection inside the C++ kernel:
    ``NativeProjectedRecurrence.apply(x_in, rows, weight_ih, input_bias, att, weight_hh, bias_hh, steps, mode,
    bf16_products)`` equals ``PackedRecurrence.apply(x_in[rows] @ weight_ih.T, att, weight_hh, bias_hh, steps,
    mode, input_bias, bf16_products)`` with the projection's sums in float32 (its operands rounded to bf16 too
    under ``bf16_products``) -- :func:`projected_recurrence_reference`.

    Why: DIEN's two input projections were linear layers of their own, ``[N, I] -> [N, G]``, whose output (bf16
    under autocast) the recurrence then read back. In the kernel each step's part projects its own rows into a
    scratch that the step's loop reads while in cache (``ops/recurrence_kernel.h``, ``Projection``): no ``[N,
    G]`` input is stored, and the projection's output is not rounded. The backward is the recurrence's, then the
    linear layer's for ``x_in`` and ``weight_ih`` (one large product for ``weight_ih``'s gradient: a product per
    step, tried, was slower). CPU, float32 ``x_in``, ``weight_ih`` and ``weight_hh``; ``rows [N]`` distinct
    int64 or None (row ``r`` of the packed steps reads ``x_in[rows[r]]``; None: ``x_in`` is in packed
    order).

    ``last_rows [B0]`` (B0 = ``steps[0]``; :attr:`~din_torchrec.modules.interest_evolution.PackedLayout.last_rows`:
    the packed row of the last step of each rank): the result is only those states, ``out[last_rows]`` ``[B0,
    H]``. Why: where only the final states are used (DIEN's evolution), the gradient of ``out[last_rows]`` would
    otherwise be scattered into an ``[N, H]`` zero tensor (the profiler charged it 0.6-0.7 ms per DIEN step at N =
    26k; measured paired, the step is 0.3 ms faster without it); the kernel's backward takes the ``[B0, H]``
    gradient as it is."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x_in: torch.Tensor,
        rows: torch.Tensor | None,
        weight_ih: torch.Tensor,
        input_bias: torch.Tensor | None,
        att: torch.Tensor | None,
        weight_hh: torch.Tensor,
        bias_hh: torch.Tensor | None,
        steps: list[int],
        mode: str,
        bf16_products: bool = False,
        last_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        mod = native.kernels()
        assert mod is not None
        code = MODES.index(mode)
        x_in, w_ih, w = x_in.contiguous(), weight_ih.contiguous(), weight_hh.contiguous()
        rows_c = None if rows is None else rows.contiguous()
        att_c = None if att is None else att.contiguous()
        out, sig, cand, hh_n = mod.recurrence_forward(
            x_in,
            att_c,
            w,
            None if bias_hh is None else bias_hh.contiguous(),
            None if input_bias is None else input_bias.contiguous(),
            list(steps),
            code,
            bf16_products,
            rows_c,
            w_ih,
        )
        ctx.steps, ctx.code, ctx.bf16_products = list(steps), code, bf16_products
        ctx.has_bias, ctx.has_input_bias = bias_hh is not None, input_bias is not None
        ctx.save_for_backward(x_in, rows_c, w_ih, att_c, w, out, sig, cand, hh_n)
        ctx.final_only = last_rows is not None
        return out if last_rows is None else out.index_select(0, last_rows)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x_in, rows, w_ih, att = ctx.saved_tensors[:4]
        mod = native.kernels()
        assert mod is not None
        bf16 = ctx.bf16_products  # x's gradient in bf16, as the linear kernel's bf16 backward takes it
        dx, datt, dweight, dbias, dinput_bias = _kernel_backward(
            ctx, grad_out, ctx.saved_tensors[3:], bf16, ctx.final_only
        )
        need_dx, _, need_dw = ctx.needs_input_grad[:3]
        if bf16:  # reads x_in's rows by index and scatters their gradient back itself
            dx_in, dweight_ih, _, _ = mod.linear_backward(
                dx, x_in, w_ih, need_dx, need_dw, False, None, 0, rows
            )
        else:
            x_sel = x_in if rows is None else x_in.index_select(0, rows)
            dx_sel, dweight_ih, _, _ = mod.linear_backward(
                dx, x_sel, w_ih, need_dx, need_dw, False, None, 0, None
            )
            dx_in = (
                dx_sel if rows is None or not need_dx else torch.zeros_like(x_in).index_copy_(0, rows, dx_sel)
            )
        return (
            dx_in if need_dx else None,
            None,
            dweight_ih if need_dw else None,
            (dinput_bias if ctx.has_input_bias else None),
            (datt if att is not None else None),
            dweight,
            (dbias if ctx.has_bias else None),
            None,
            None,
            None,
            None,
        )


def projected_recurrence_reference(
    x_in: torch.Tensor,
    rows: torch.Tensor | None,
    weight_ih: torch.Tensor,
    input_bias: torch.Tensor | None,
    att: torch.Tensor | None,
    weight_hh: torch.Tensor,
    bias_hh: torch.Tensor | None,
    steps: list[int],
    mode: str,
    bf16_products: bool = False,
) -> torch.Tensor:
    """What :class:`NativeProjectedRecurrence` computes, in PyTorch: the projection as a matmul with float32
    sums and output (on operands rounded to bf16 under ``bf16_products``), then :class:`PackedRecurrence`. (The
    kernel's backward also rounds x's gradient to bf16 under ``bf16_products``, as a bf16 matmul's backward
    does; this one keeps it in float32.)"""
    x = x_in if rows is None else x_in.index_select(0, rows)
    x = _product_operand(x, bf16_products) @ _product_operand(weight_ih, bf16_products).t()
    return PackedRecurrence.apply(x, att, weight_hh, bias_hh, steps, mode, input_bias, bf16_products)


def projected_recurrence(
    x_in: torch.Tensor,
    rows: torch.Tensor | None,
    weight_ih: torch.Tensor,
    input_bias: torch.Tensor | None,
    att: torch.Tensor | None,
    weight_hh: torch.Tensor,
    bias_hh: torch.Tensor | None,
    steps: list[int],
    mode: str,
    project: Callable[[], torch.Tensor],
    last_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """``packed_recurrence(W_ih x_in[rows], att, weight_hh, bias_hh, steps, mode, input_bias)``, with the
    projection inside the native kernel where it runs (:class:`NativeProjectedRecurrence`: CPU, float32
    ``x_in`` and weights, under bf16 autocast or none; bf16 products under bf16 autocast with even sizes, as
    :func:`packed_recurrence`). Elsewhere ``project()`` makes the projected ``[N, G]`` input (the caller's
    layer: ``F.linear``, the linear kernel, cuDNN's path...) and :func:`packed_recurrence` runs on it.

    Args:
        x_in: ``[X, I]`` inputs; ``rows``: ``[N]`` distinct rows of it in the steps' packed order (None:
            ``x_in`` is in that order, X = N).
        weight_ih: ``[G, I]``; ``input_bias``: ``[G]`` or None; the rest as :func:`packed_recurrence`.
        last_rows: ``[steps[0]]``, the packed row of each rank's last step (``PackedLayout.last_rows``), or
            None. Given, only those states are returned, ``[steps[0], H]`` (see
            :class:`NativeProjectedRecurrence`).
    """
    if x_in.dim() != 2 or weight_ih.dim() != 2 or weight_ih.shape[1] != x_in.shape[1]:
        raise ValueError(
            f"projected_recurrence ({mode}): expected x_in [X, I] and weight_ih [G, I], got "
            f"{tuple(x_in.shape)} and {tuple(weight_ih.shape)}"
        )
    n = x_in.shape[0] if rows is None else rows.shape[0]
    _check_arguments((n, weight_ih.shape[0]), att, weight_hh, bias_hh, steps, mode, input_bias)
    hidden = weight_hh.shape[1]
    autocast = torch.is_autocast_enabled(x_in.device.type)
    bf16_autocast = (
        autocast and x_in.device.type == "cpu" and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    fused = (
        native.usable(x_in, (torch.float32,))
        and sum(steps) > 0
        and all(t.dtype == torch.float32 for t in (weight_ih, weight_hh))
        and (not autocast or bf16_autocast)
    )
    if last_rows is not None and last_rows.shape != (steps[0] if steps else 0,):
        raise ValueError(
            f"projected_recurrence ({mode}): last_rows must be [{steps[0] if steps else 0}] (one row per "
            f"sequence), got {tuple(last_rows.shape)}"
        )
    if not fused:
        out = packed_recurrence(project(), att, weight_hh, bias_hh, steps, mode, input_bias)
        return out if last_rows is None else out.index_select(0, last_rows)
    bf16_products = _bf16_products(x_in.device.type, hidden, x_in.shape[1])
    with torch.autocast(device_type="cpu", enabled=False):
        return NativeProjectedRecurrence.apply(
            x_in,
            rows,
            weight_ih,
            None if input_bias is None else input_bias.float(),
            None if att is None else att.float(),
            weight_hh,
            None if bias_hh is None else bias_hh.float(),
            steps,
            mode,
            bf16_products,
            last_rows,
        )
