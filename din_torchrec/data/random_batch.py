"""Random batches straight from the feature config, for tests and benchmarks that need no files."""

from __future__ import annotations

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from din_torchrec.config import FeaturesConfig
from din_torchrec.data.batch import Batch
from din_torchrec.data.negatives import negative_column


def random_batch(
    features: FeaturesConfig,
    batch_size: int,
    max_history: int,
    generator: torch.Generator | None = None,
    min_history: int = 0,
    lengths: torch.Tensor | None = None,
    with_negatives: bool = False,
) -> Batch:
    """A batch of uniformly random ids (ids >= 1; 0 stays the reserved id) and random labels.

    Args:
        lengths: ``[B]`` history lengths; drawn uniformly in ``[min_history, max_history]`` when None.
        with_negatives: also the ``neg_<history_column>`` keys DIEN's auxiliary loss reads (random ids,
            not checked against the history).
    """
    g = generator
    b = batch_size
    if lengths is None:
        lengths = torch.randint(min_history, max_history + 1, (b,), generator=g)
    lengths = lengths.to(torch.int64)
    n = int(lengths.sum())
    seq_keys, seq_values, seq_lengths = [], [], []
    for t in features.sequence:
        seq_keys.append(t.target_column)
        seq_values.append(torch.randint(1, t.num_embeddings, (b,), generator=g))
        seq_lengths.append(torch.ones(b, dtype=torch.int64))
    for t in features.sequence:
        seq_keys.append(t.history_column)
        seq_values.append(torch.randint(1, t.num_embeddings, (n,), generator=g))
        seq_lengths.append(lengths)
    if with_negatives:
        for t in features.sequence:
            seq_keys.append(negative_column(t.history_column))
            seq_values.append(torch.randint(1, t.num_embeddings, (n,), generator=g))
            seq_lengths.append(lengths)
    prof_keys = [p.column for p in features.profile]
    prof_values = [torch.randint(0, p.num_embeddings, (b,), generator=g) for p in features.profile]
    sequence = KeyedJaggedTensor.from_lengths_sync(seq_keys, torch.cat(seq_values), torch.cat(seq_lengths))
    profile = KeyedJaggedTensor.from_lengths_sync(
        prof_keys,
        torch.cat(prof_values) if prof_values else torch.zeros(0, dtype=torch.int64),
        torch.ones(b * len(prof_keys), dtype=torch.int64),
    )
    start = torch.randint(1_600_000_000, 1_700_000_000, (b,), generator=g)
    # Oldest first: each sample's behaviours are its start time plus a running sum of random gaps.
    gaps = torch.randint(0, 3600, (n,), generator=g)
    running = torch.cumsum(gaps, 0)
    before_sample = torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
    running_before = torch.cat([torch.zeros(1, dtype=running.dtype), running])[before_sample]
    hist_ts = torch.repeat_interleave(start, lengths) + running - running_before
    user_col = features.user_column
    user_ids = (
        prof_values[prof_keys.index(user_col)].clone()
        if user_col in prof_keys
        else torch.randint(0, 1000, (b,), generator=g)
    )
    return Batch(
        sequence_features=sequence,
        profile_features=profile,
        labels=torch.randint(0, 2, (b,), generator=g).float(),
        user_ids=user_ids,
        hist_timestamps=hist_ts,
        hist_lengths=lengths,
        target_timestamps=start + 3600 * (lengths + 1),
        valid=torch.ones(b),
    )
