"""Taobao User Behavior (Alibaba, Tianchi dataset 649): ``UserBehavior.csv``.

No header; one behaviour per line: ``user_id,item_id,category_id,behavior_type,timestamp`` with
``behavior_type`` one of ``pv`` (page view, i.e. a click), ``buy``, ``cart``, ``fav`` and ``timestamp`` in
unix seconds. The full file has about 100M lines (3.4 GB), so it is read **streaming** with
``pyarrow.csv.open_csv`` in blocks and every check and conversion is a vectorised arrow/numpy operation on a
whole block (no Python loop per line).

* Only the ``behavior_types`` (default ``pv``: clicks) are behaviours; the other lines are counted under
  ``ignored.other_behavior_types``. Timestamps are kept as they are (DSIN cuts sessions on them).
* The category is given per line. **An item's category is the one on its first kept line**; items whose
  lines disagree are counted under ``ignored.item_category_conflicts`` (their other lines take that
  category, as the data format needs one category per item).
* Bad lines (``on_error``): a line without exactly 5 comma-separated fields (``malformed_line``, found by
  the CSV parser), a field that is not a non-negative integer of at most 18 digits or an unknown behaviour
  type (``bad_value``; a blank line is one too). Under ``skip`` the counts per reason and the first line of
  each go to ``meta.json``.

Memory: the kept behaviours are held as int32 arrays (int64 where a value needs it): ~16 bytes per click
while reading, ~80 bytes per click at the peak while the samples are built (measured: 1.4 GB above the
process baseline for 17.9M clicks; the full file's ~89.7M clicks need about 7-8 GB).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from din_torchrec.data.prepare.core import SourceData, TrainingHints, encode_ids
from din_torchrec.data.prepare.errors import ErrorLog, PrepareError, require_file

__all__ = ["BEHAVIOR_TYPES", "COLUMNS", "read_taobao"]

COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
BEHAVIOR_TYPES = ("pv", "buy", "cart", "fav")
_NUMERIC = ("user_id", "item_id", "category_id", "timestamp")
_INT = r"^[0-9]{1,18}$"


class _LineMap:
    """Physical line of the g-th delivered row, given the lines the CSV parser skipped (ascending)."""

    def __init__(self) -> None:
        self.skipped: list[int] = []

    def line(self, delivered_index: int) -> int:
        # The smallest L with L - #(skipped lines <= L) == delivered_index + 1 (a fixed point, few steps).
        target = delivered_index + 1
        line = target
        while True:
            nxt = target + bisect.bisect_right(self.skipped, line)
            if nxt == line:
                return line
            line = nxt


def read_taobao(
    csv: str | Path,
    *,
    log: ErrorLog,
    behavior_types: Sequence[str] = ("pv",),
    block_size: int = 16 << 20,
    progress: bool = False,
) -> SourceData:
    """Stream ``UserBehavior.csv`` (plain or ``.gz``) into behaviours (see the module docstring)."""
    bad_types = [t for t in behavior_types if t not in BEHAVIOR_TYPES]
    if bad_types or not behavior_types:
        raise ValueError(
            f"behavior_types: expected a non-empty subset of {list(BEHAVIOR_TYPES)}, got {list(behavior_types)}"
        )
    from tqdm import tqdm

    path = require_file(csv, "the Taobao UserBehavior.csv: user,item,category,behavior_type,timestamp lines")
    lines = _LineMap()
    parse_error: list[tuple[int | None, int, str]] = []

    def invalid_row(row: pcsv.InvalidRow) -> str:
        number = row.number
        if log.on_error == "raise":
            parse_error.append((number, row.actual_columns, row.text))
            return "error"
        log.report(
            path,
            number,
            "malformed_line",
            f"expected {len(COLUMNS)} comma-separated fields ({','.join(COLUMNS)}), got {row.actual_columns}: "
            f"{row.text[:80]!r}",
        )
        if number is not None:
            lines.skipped.append(number)
        return "skip"

    read_options = pcsv.ReadOptions(column_names=list(COLUMNS), use_threads=False, block_size=block_size)
    parse_options = pcsv.ParseOptions(invalid_row_handler=invalid_row, ignore_empty_lines=False)
    # Binary, not string: a line with bytes that are not UTF-8 is then a bad value with its line number
    # instead of a conversion error for the whole block.
    convert_options = pcsv.ConvertOptions(column_types={c: pa.binary() for c in COLUMNS})
    wanted = pa.array([t.encode() for t in behavior_types], pa.binary())
    known_types = pa.array([t.encode() for t in BEHAVIOR_TYPES], pa.binary())
    parts: dict[str, list[np.ndarray]] = {c: [] for c in _NUMERIC}
    delivered = other = 0
    bar = tqdm(desc="UserBehavior.csv", unit=" lines", unit_scale=True, disable=not progress)
    try:
        stream = pa.input_stream(str(path), compression="detect")
        reader = pcsv.open_csv(stream, read_options, parse_options, convert_options)
        for rb in reader:
            n = rb.num_rows
            ok = pc.is_in(rb.column("behavior_type"), value_set=known_types)
            for c in _NUMERIC:
                ok = pc.and_(ok, pc.match_substring_regex(rb.column(c), _INT))
            ok_np = ok.to_numpy(zero_copy_only=False)
            if not ok_np.all():
                bad = np.flatnonzero(~ok_np)
                i = int(bad[0])
                values = [rb.column(c)[i].as_py().decode("utf-8", "replace") for c in COLUMNS]
                log.report(
                    path,
                    lines.line(delivered + i),
                    "bad_value",
                    f"expected non-negative integer ids and timestamp and a behaviour type in "
                    f"{list(BEHAVIOR_TYPES)}, got {values}",
                    count=len(bad),
                )
                rb = rb.filter(pa.array(ok_np))
            keep = pc.is_in(rb.column("behavior_type"), value_set=wanted)
            kept = rb.filter(keep)
            other += rb.num_rows - kept.num_rows
            for c in _NUMERIC:
                values = pc.cast(pc.cast(kept.column(c), pa.string()), pa.int64()).to_numpy()
                # int32 where the block allows (Taobao's ids and 2017 timestamps do): half the memory.
                fits = values.size == 0 or values.max() <= np.iinfo(np.int32).max
                parts[c].append(values.astype(np.int32) if fits else values)
            delivered += n
            bar.update(n)
    except pa.ArrowInvalid as e:
        if parse_error:
            number, got, text = parse_error[0]
            raise PrepareError(
                f"{path}:{number if number is not None else '?'}: expected {len(COLUMNS)} comma-separated fields "
                f"({','.join(COLUMNS)}), got {got}: {text[:80]!r} (pass on_error='skip' / --on-error skip to "
                f"leave such lines out and count them)"
            ) from e
        raise PrepareError(f"{path}: cannot parse as CSV ({e})") from e
    except OSError as e:
        raise PrepareError(f"{path}: cannot read file ({type(e).__name__}: {e})") from e
    finally:
        bar.close()
    pa.default_memory_pool().release_unused()  # the blocks' string buffers

    def column(c: str) -> np.ndarray:
        arrays = parts.pop(c)
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)

    user_raw = column("user_id")
    user, user_vocab = encode_ids(user_raw)
    del user_raw
    item_raw = column("item_id")
    item_vocab, first, item_inv = np.unique(item_raw, return_index=True, return_inverse=True)
    del item_raw
    item = (item_inv.reshape(-1) + 1).astype(np.int32 if len(item_vocab) < 2**31 - 1 else np.int64)
    del item_inv
    cat_raw = column("category_id")
    item_cat_raw = cat_raw[first]  # the category on each item's first kept line
    conflicts = int(np.unique(item[cat_raw != item_cat_raw[item - 1]]).size) if len(item) else 0
    del cat_raw, first
    cat_ids, cat_vocab = encode_ids(item_cat_raw)
    item_category = np.zeros(len(item_vocab) + 1, dtype=np.int64)
    item_category[1:] = cat_ids
    timestamp = column("timestamp")

    return SourceData(
        name="taobao",
        user=user,
        item=item,
        timestamp=timestamp,
        item_category=item_category,
        vocab={"user": user_vocab, "item": item_vocab, "category": cat_vocab},
        files={"csv": str(path)},
        counts={"lines": delivered},
        ignored={"other_behavior_types": other, "item_category_conflicts": conflicts},
        options={"behavior_types": list(behavior_types)},
        hints=TrainingHints(
            embedding_dim=16,
            max_history=50,
            batch_size=4096,
            eval_batch_size=8192,
            comment="DSIN on the same data: --set model.name=dsin (sessions are cut on hist_timestamps).",
        ),
        category_rule="the category_id on the item's first kept line",
    )
