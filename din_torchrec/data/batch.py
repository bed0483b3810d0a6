"""The training batch: what the reader yields and every model consumes."""

from __future__ import annotations

from dataclasses import dataclass, field

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


@dataclass
class Batch(Pipelineable):
    """One mini-batch of B samples.

    Attributes:
        sequence_features: KJT for the EmbeddingCollection. For each sequence table two keys: its
            ``target_column`` (exactly one id per sample) and its ``history_column`` (the behaviour ids,
            oldest first, at most ``max_history`` most recent; jagged, no padding).
        profile_features: KJT for the EmbeddingBagCollection, one key per profile column.
        labels: ``[B]`` float32, 0 or 1.
        user_ids: ``[B]`` int64, the grouping key of gAUC.
        hist_timestamps: ``[N]`` int64, one per behaviour (N = sum of history lengths), aligned with the
            history ids.
        hist_lengths: ``[B]`` int64, history length per sample.
        target_timestamps: ``[B]`` int64.
        reg_weights: per KJT key, ``[num values]`` float32: the mini-batch-aware regularization coefficient of
            each looked-up id (see ``training.regularization``). Empty when regularization is off.
        valid: ``[B]`` float32, 1 for real samples, 0 for rows that only pad the last evaluation batch.
    """

    sequence_features: KeyedJaggedTensor
    profile_features: KeyedJaggedTensor
    labels: torch.Tensor
    user_ids: torch.Tensor
    hist_timestamps: torch.Tensor
    hist_lengths: torch.Tensor
    target_timestamps: torch.Tensor
    reg_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    valid: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.labels.numel())

    def valid_mask(self) -> torch.Tensor:
        """``[B]`` float32 weights: ``valid`` or all ones."""
        return self.valid if self.valid is not None else torch.ones_like(self.labels)

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return Batch(
            sequence_features=self.sequence_features.to(device=device, non_blocking=non_blocking),
            profile_features=self.profile_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            user_ids=self.user_ids.to(device=device, non_blocking=non_blocking),
            hist_timestamps=self.hist_timestamps.to(device=device, non_blocking=non_blocking),
            hist_lengths=self.hist_lengths.to(device=device, non_blocking=non_blocking),
            target_timestamps=self.target_timestamps.to(device=device, non_blocking=non_blocking),
            reg_weights={
                k: v.to(device=device, non_blocking=non_blocking) for k, v in self.reg_weights.items()
            },
            valid=None if self.valid is None else self.valid.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:  # pragma: no cover - CUDA only
        self.sequence_features.record_stream(stream)
        self.profile_features.record_stream(stream)
        for t in (
            self.labels,
            self.user_ids,
            self.hist_timestamps,
            self.hist_lengths,
            self.target_timestamps,
        ):
            t.record_stream(stream)
        for v in self.reg_weights.values():
            v.record_stream(stream)
        if self.valid is not None:
            self.valid.record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(
            sequence_features=self.sequence_features.pin_memory(),
            profile_features=self.profile_features.pin_memory(),
            labels=self.labels.pin_memory(),
            user_ids=self.user_ids.pin_memory(),
            hist_timestamps=self.hist_timestamps.pin_memory(),
            hist_lengths=self.hist_lengths.pin_memory(),
            target_timestamps=self.target_timestamps.pin_memory(),
            reg_weights={k: v.pin_memory() for k, v in self.reg_weights.items()},
            valid=None if self.valid is None else self.valid.pin_memory(),
        )


def _slice_kjt(kjt: KeyedJaggedTensor, start: int, end: int) -> KeyedJaggedTensor:
    """Rows ``[start, end)`` of every key of a KJT."""
    per_key = kjt.to_dict()
    keys, values, lengths = [], [], []
    for k in kjt.keys():
        jt = per_key[k]
        offsets = jt.offsets()
        keys.append(k)
        values.append(jt.values()[int(offsets[start]) : int(offsets[end])])
        lengths.append(jt.lengths()[start:end])
    if not keys:
        return kjt
    return KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(values), torch.cat(lengths))


def _value_range(lengths: torch.Tensor, start: int, end: int) -> tuple[int, int]:
    offsets = torch.ops.fbgemm.asynchronous_complete_cumsum(lengths)
    return int(offsets[start]), int(offsets[end])


def slice_batch(batch: Batch, start: int, end: int) -> Batch:
    """Samples ``[start, end)`` of a batch (micro-batches, per-rank parts of a global batch)."""
    lo, hi = _value_range(batch.hist_lengths, start, end)
    reg: dict[str, torch.Tensor] = {}
    if batch.reg_weights:
        for kjt in (batch.sequence_features, batch.profile_features):
            per_key = kjt.to_dict()
            for k in kjt.keys():
                if k in batch.reg_weights:
                    a, b = _value_range(per_key[k].lengths(), start, end)
                    reg[k] = batch.reg_weights[k][a:b]
    return Batch(
        sequence_features=_slice_kjt(batch.sequence_features, start, end),
        profile_features=_slice_kjt(batch.profile_features, start, end),
        labels=batch.labels[start:end],
        user_ids=batch.user_ids[start:end],
        hist_timestamps=batch.hist_timestamps[lo:hi],
        hist_lengths=batch.hist_lengths[start:end],
        target_timestamps=batch.target_timestamps[start:end],
        reg_weights=reg,
        valid=None if batch.valid is None else batch.valid[start:end],
    )
