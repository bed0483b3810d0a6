"""Mini-batch-aware L2 regularization of embedding rows (DIN paper, section 4.1).

For a mini-batch, the penalty on table rows is

    reg = lambda * sum_j  a_j / n_j * ||w_j||^2

over the rows j the batch touched, where n_j is row j's frequency in the training data and ``a_j`` is the
number of times row j occurs in the batch (``mode="count"``) or 1 (``mode="indicator"``, the paper's
I(x_j != 0)). Rows the batch did not touch get no gradient from it.

How it is computed, and why this way: the penalty is put on the *looked-up embeddings* (the collection's
output values), not on the weight tensors. With a fused optimizer the weights are not ordinary parameters
(the update happens inside the backward of the lookup) and with sharding no rank holds the whole table, but
the looked-up values exist on every rank in the layout the model sees. Each position i that looked up row j
gets the coefficient ``c_i`` with

    count mode:      c_i = 1 / n_j                (summed over the a_j positions: a_j / n_j)
    indicator mode:  c_i = 1 / (n_j * a_j)        (summed over the a_j positions: 1 / n_j)

so ``sum_i c_i ||e_i||^2`` equals the formula above, and autograd routes ``2 lambda c_i e_i`` into exactly the
touched rows through whatever optimizer the table uses. The coefficients are computed in the data loader (it
has the frequency table), which keeps ``unique`` out of the model's forward.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from din_torchrec.ops import native


def mba_coefficients(
    ids_by_key: Mapping[str, np.ndarray],
    table_of_key: Mapping[str, str],
    frequencies: Mapping[str, np.ndarray],
    mode: str = "count",
) -> dict[str, np.ndarray]:
    """Per-position coefficients ``c_i`` for every key (feature) of a batch.

    Args:
        ids_by_key: feature name -> ``[num values]`` int64 ids looked up by that feature in this batch.
        table_of_key: feature name -> table name; features of one table are counted together (the candidate
            and the history share the item table, so an item appearing in both counts twice).
        frequencies: table name -> ``[num_embeddings]`` counts n_j over the training data. A zero count (an
            id never seen in training) is treated as 1.
        mode: ``"count"`` or ``"indicator"``.

    Returns:
        feature name -> ``[num values]`` float32 coefficients.
    """
    if mode not in ("count", "indicator"):
        raise ValueError(f"regularization mode: expected 'count' or 'indicator', got {mode!r}")
    keys_by_table: dict[str, list[str]] = {}
    for key in ids_by_key:
        keys_by_table.setdefault(table_of_key[key], []).append(key)
    out: dict[str, np.ndarray] = {}
    for table, keys in keys_by_table.items():
        freq = frequencies[table]
        ids = np.concatenate([np.asarray(ids_by_key[k], dtype=np.int64) for k in keys])
        n = np.maximum(freq[ids], 1).astype(np.float64)
        if mode == "count":
            coeff = 1.0 / n
        else:
            _, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
            coeff = 1.0 / (n * counts[inverse])
        start = 0
        for k in keys:
            size = len(ids_by_key[k])
            out[k] = coeff[start : start + size].astype(np.float32)
            start += size
    return out


def kjt_mba_coefficients(
    kjt: KeyedJaggedTensor,
    table_of_key: Mapping[str, str],
    frequencies: Mapping[str, np.ndarray],
    mode: str = "count",
) -> dict[str, torch.Tensor]:
    """:func:`mba_coefficients` for the keys of a KJT, as tensors aligned with each key's values."""
    per_key = kjt.to_dict()
    ids = {k: per_key[k].values().numpy() for k in kjt.keys() if k in table_of_key}
    return {k: torch.from_numpy(v) for k, v in mba_coefficients(ids, table_of_key, frequencies, mode).items()}


class _WeightedSquaredNorms(torch.autograd.Function):
    """``sum_i c_i ||v_i||^2`` for ``v: [N, D]``, ``c: [N]`` (float32 sums), with its gradient ``2 g c_i v_i``
    in one pass. Written out because autograd's ``(v.pow(2).sum(-1) * c).sum()`` made six passes over
    ``[N, D]`` each way (pow, sum, mul; pow's backward as two muls and a copy): ~0.9 ms of a DIEN step on
    the CPU for the sequence keys' 26k rows."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        acc = torch.promote_types(v.dtype, torch.float32)  # float32 sums for bf16 rows; float64 stays
        v32, c32 = v.to(acc), c.to(acc)
        ctx.save_for_backward(v, c32)
        # (v * c[:, None]) . v: one elementwise pass and one dot product.
        return torch.dot((v32 * c32.unsqueeze(-1)).reshape(-1), v32.reshape(-1))

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        v, c32 = ctx.saved_tensors
        grad = v.to(c32.dtype) * (c32 * (2.0 * g)).unsqueeze(-1)
        return grad.to(v.dtype), None


class _NativeWeightedSquaredNorms(torch.autograd.Function):
    """:class:`_WeightedSquaredNorms` summed over all keys in one native call each way
    (``ops/regularization_kernel.h``: one read of each key's rows forward, one write of each gradient backward;
    float64 sums): ``apply(coefficients, *values)`` for float32 CPU ``values [n_k, D_k]`` and ``coefficients
    [n_k]``."""

    @staticmethod
    def forward(ctx, coefficients: list[torch.Tensor], *values: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        mod = native.kernels()
        assert mod is not None
        ctx.coefficients = coefficients
        ctx.save_for_backward(*values)
        return mod.weighted_squared_norms(list(values), coefficients)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        mod = native.kernels()
        assert mod is not None
        grads = mod.weighted_squared_norms_backward(list(ctx.saved_tensors), ctx.coefficients, float(g))
        return (None, *(gr if need else None for gr, need in zip(grads, ctx.needs_input_grad[1:])))


def mba_penalty(
    embeddings: Mapping[str, torch.Tensor | JaggedTensor],
    coefficients: Mapping[str, torch.Tensor],
) -> torch.Tensor:
    """``sum_k sum_i c_{k,i} * ||e_{k,i}||^2`` over the looked-up embeddings of the keys in ``coefficients``.

    Args:
        embeddings: feature name -> looked-up rows, ``[num values, D]`` (a JaggedTensor's values, or the
            pooled ``[B, D]`` output of a bag whose every sample has exactly one id).
        coefficients: feature name -> ``[num values]`` coefficients from :func:`mba_coefficients`.
    """
    keys: list[tuple[torch.Tensor, torch.Tensor]] = []
    for key, c in coefficients.items():
        e = embeddings[key]
        values = e.values() if isinstance(e, JaggedTensor) else e
        if values.shape[0] != c.shape[0]:
            raise ValueError(
                f"regularization for {key!r}: {c.shape[0]} coefficients for {values.shape[0]} looked-up rows"
            )
        keys.append((values, c.to(values.device)))
    if not keys:
        return torch.zeros(())
    if all(
        native.usable(v) and v.dim() == 2 and v.stride(1) == 1 and c.dtype == torch.float32 for v, c in keys
    ):
        return _NativeWeightedSquaredNorms.apply([c.contiguous() for _, c in keys], *(v for v, _ in keys))
    total = _WeightedSquaredNorms.apply(*keys[0])
    for values, c in keys[1:]:
        total = total + _WeightedSquaredNorms.apply(values, c)
    return total
