"""Splitting jagged behaviour histories into sessions by time gaps (DSIN's session division), vectorised.

Conventions (the DSIN inputs are built from these):

* Input is the model's jagged layout: ``values [N, D]`` and ``timestamps [N]`` (int64 unix seconds), sample
  after sample, oldest first within a sample, ``lengths [B]``.
* A new session starts at each sample's first behaviour and wherever the gap to the previous behaviour of
  the same sample is *strictly greater* than ``gap_seconds``. A gap exactly equal to ``gap_seconds`` stays in
  the same session (as does a tie, gap 0, and an out-of-order negative gap).
* Session ids are 0-based within a sample, oldest session 0.
* The dense block keeps the most recent ``K`` sessions of a sample and, inside a session, its most recent
  ``L`` behaviours. Both are left-aligned and chronological: slot ``0`` is the oldest *kept* session, slot
  ``n - 1`` the most recent (n = kept sessions); inside a session position ``0`` is the oldest kept
  behaviour. Real slots therefore form a prefix, which is what ``pack_padded_sequence`` (the Bi-LSTM across
  sessions) needs, and a recurrent pass reads time forward.

No Python loop over samples or behaviours: everything is cumsum / cummax / index_add on the ``N`` rows.
"""

from __future__ import annotations

import torch

from din_torchrec.modules.attention import complete_offsets, segment_ids


def _session_starts(timestamps: torch.Tensor, lengths: torch.Tensor, gap_seconds: int) -> torch.Tensor:
    """``[N]`` bool: True where a behaviour opens a session (see the module docstring)."""
    n = timestamps.numel()
    starts = torch.zeros(n, dtype=torch.bool, device=timestamps.device)
    if n == 0:
        return starts
    starts[1:] = (timestamps[1:] - timestamps[:-1]) > gap_seconds
    firsts = complete_offsets(lengths)[:-1][lengths > 0]  # index of each non-empty sample's first behaviour
    starts[firsts] = True
    return starts


def session_boundaries(timestamps: torch.Tensor, lengths: torch.Tensor, gap_seconds: int) -> torch.Tensor:
    """Session id of every behaviour, 0-based within its sample, oldest session 0.

    A new session starts at a sample's first behaviour and where ``t_i - t_{i-1} > gap_seconds`` (strictly:
    a gap exactly at the threshold stays in the session).

    Args:
        timestamps: ``[N]`` int64, jagged, oldest first within each sample.
        lengths: ``[B]`` behaviours per sample (0 allowed), ``sum == N``.
        gap_seconds: the session gap threshold in seconds.

    Returns:
        ``[N]`` int64 session ids.
    """
    starts = _session_starts(timestamps, lengths, gap_seconds)
    global_id = torch.cumsum(starts, 0) - 1  # session index over the whole batch
    # Subtract the global id of the sample's first session (the one at the sample's first behaviour).
    first = complete_offsets(lengths)[:-1].index_select(0, segment_ids(lengths))
    return global_id - global_id.index_select(0, first)


def session_boundaries_reference(
    timestamps: torch.Tensor, lengths: torch.Tensor, gap_seconds: int
) -> torch.Tensor:
    """Plain per-user Python loop computing :func:`session_boundaries` (for tests); the result lies on the
    timestamps' device, as the fast path's does."""
    ts = [int(t) for t in timestamps.tolist()]
    out: list[int] = []
    start = 0
    for n in lengths.tolist():
        session = 0
        for j in range(n):
            if j > 0 and ts[start + j] - ts[start + j - 1] > gap_seconds:
                session += 1
            out.append(session)
        start += n
    return torch.tensor(out, dtype=torch.long, device=timestamps.device)


def sessionize(
    values: torch.Tensor,
    timestamps: torch.Tensor,
    lengths: torch.Tensor,
    gap_seconds: int,
    max_sessions: int,
    max_session_len: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scatter a jagged history into a dense ``[B, K, L, D]`` block of sessions.

    Keeps the most recent ``K`` sessions of each sample and the most recent ``L`` behaviours of each
    session; slots are left-aligned and chronological (module docstring). Differentiable w.r.t. ``values``
    (a dropped behaviour gets zero gradient).

    Args:
        values: ``[N, D]`` behaviour embeddings, jagged, oldest first within each sample.
        timestamps: ``[N]`` int64 unix seconds aligned with ``values``.
        lengths: ``[B]`` behaviours per sample (0 allowed).
        gap_seconds: session gap threshold (strict ``>``, see :func:`session_boundaries`).
        max_sessions: K.
        max_session_len: L.

    Returns:
        ``(sessions [B, K, L, D], behaviour_mask [B, K, L] bool, session_mask [B, K] bool)``; padded slots of
        ``sessions`` are zeros; ``session_mask[b, k] == behaviour_mask[b, k].any()`` and is a prefix of
        each row.
    """
    k_max, l_max = max_sessions, max_session_len
    b, d = lengths.numel(), values.shape[-1]
    n = values.shape[0]
    device = values.device
    segments = segment_ids(lengths)
    starts = _session_starts(timestamps, lengths, gap_seconds)
    global_id = torch.cumsum(starts, 0) - 1
    first = complete_offsets(lengths)[:-1].index_select(0, segments)
    local_id = global_id - global_id.index_select(0, first)

    # Sessions per sample; slot = local id shifted so that the most recent K land in 0..K-1.
    n_sessions = torch.zeros(b, dtype=torch.long, device=device).index_add(0, segments, starts.long())
    slot = local_id - (n_sessions - k_max).clamp_min(0).index_select(0, segments)

    # Position inside the session: index minus the session's first index (running max of start indices);
    # shifted so that the most recent L land in 0..L-1. Session lengths are counted into an [N] buffer
    # (there are at most N sessions), which avoids a device sync on the number of sessions.
    idx = torch.arange(n, device=device)
    session_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), 0).values
    session_len = torch.zeros(n, dtype=torch.long, device=device).index_add(
        0, global_id, torch.ones_like(idx)
    )
    pos = idx - session_start - (session_len.index_select(0, global_id) - l_max).clamp_min(0)

    keep = (slot >= 0) & (pos >= 0)
    # Dropped behaviours go to one spare row past the block, sliced off afterwards: no data-dependent shapes.
    dump = b * k_max * l_max
    flat = torch.where(keep, (segments * k_max + slot) * l_max + pos, torch.full_like(idx, dump))
    sessions = values.new_zeros(dump + 1, d).index_add(0, flat, values)[:dump].view(b, k_max, l_max, d)
    behaviour_mask = torch.zeros(dump + 1, dtype=torch.bool, device=device)
    behaviour_mask[flat] = True
    behaviour_mask = behaviour_mask[:dump].view(b, k_max, l_max)
    session_mask = torch.arange(k_max, device=device) < n_sessions.clamp_max(k_max).unsqueeze(1)
    return sessions, behaviour_mask, session_mask
