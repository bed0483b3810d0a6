"""Amazon product data (McAuley et al., 2014 release): ``reviews_<Category>_5.json(.gz)`` + ``meta_<Category>.json(.gz)``.

* **Reviews** (the 5-core files the DIN and DIEN papers used): one JSON object per line; the fields used are
  ``reviewerID`` (user), ``asin`` (item) and ``unixReviewTime`` (seconds; day resolution). A review is a
  behaviour.
* **Meta**: one product per line, written as a *Python literal* in the 2014 release (single quotes), so a
  line is parsed with ``json.loads`` and, when that fails, ``ast.literal_eval``. The fields used are
  ``asin`` and ``categories``, a list of category paths (``[["Electronics", "Computers & Accessories",
  "Cables & Accessories"], ...]``). **An item's category is the last element of its first path**
  (``"Cables & Accessories"`` above), the most specific level of the primary path. ``category_path="last"``
  takes the last element of the *last* path instead, what the DIN repository's preprocessing does
  (``x[-1][-1]``). The 2018 release's ``category`` (one flat path) is accepted too: its last element.
* The meta file covers the whole product category (e.g. 498k products in Electronics) while the 5-core
  reviews touch a subset (63k): meta entries of items without a review are expected and counted under
  ``ignored.meta_without_reviews`` in ``meta.json`` (``unknown_meta="error"`` makes each one an error, for a
  meta file that is supposed to match the reviews exactly). Such lines are only checked for their ``asin``.
* A reviewed item without a usable meta entry (no entry, no category) is an error naming the reviews file
  and the line of the item's first review; with ``on_error="skip"`` its reviews are left out and counted.

Bad lines (``on_error``): unparsable text (``malformed_line``), a line that is not an object or lacks a field
(``missing_field``), a field of the wrong type (``bad_value``), a second meta entry of an item
(``duplicate_meta``, the first one is used). Blank lines are ignored and counted (``ignored.blank_lines``).
"""

from __future__ import annotations

import ast
import json
import re
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from din_torchrec.data.prepare.core import Interner, SourceData, TrainingHints
from din_torchrec.data.prepare.errors import ErrorLog, require_file
from din_torchrec.data.prepare.textio import iter_lines

__all__ = ["CATEGORY_PATH_CHOICES", "UNKNOWN_META_CHOICES", "parse_record", "read_amazon"]

UNKNOWN_META_CHOICES: tuple[str, ...] = ("ignore", "error")
CATEGORY_PATH_CHOICES: tuple[str, ...] = ("first", "last")
_ASIN = re.compile(rb"""["']asin["']\s*:\s*["']([^"']*)["']""")


class _Unparsable(ValueError):
    pass


def parse_record(raw: bytes) -> Any:
    """A line as a Python object: strict JSON first, then a Python literal (the 2014 meta files).

    Raises:
        _Unparsable: neither parses (message: both reasons, shortened).
    """
    try:
        return json.loads(raw)
    except ValueError as json_error:
        try:
            return ast.literal_eval(raw.decode("utf-8"))
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError) as e:
            reason = str(json_error).split(":")[0]
            raise _Unparsable(
                f"not a JSON object ({reason}) nor a Python literal ({type(e).__name__})"
            ) from e


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


def _timestamp(value: Any) -> int | None:
    """Whole seconds from an int, an integral float or a decimal string; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _category(obj: dict, which: str = "first") -> tuple[str | None, str]:
    """``(category or None, what is wrong)`` of a meta entry: the last element of the ``which`` (first or
    last) path of ``categories`` (rule in the module docstring)."""
    if "categories" in obj:
        cats = obj["categories"]
        if not isinstance(cats, (list, tuple)) or not cats:
            return None, f"'categories': expected a non-empty list of category paths, got {cats!r}"
        path = cats[0] if which == "first" else cats[-1]
        if isinstance(path, str):  # a single path written flat
            path = cats
        if not isinstance(path, (list, tuple)) or not path:
            return None, f"'categories': expected the {which} path to be a non-empty list, got {path!r}"
    elif "category" in obj:
        path = obj["category"]
        if not isinstance(path, (list, tuple)) or not path:
            return None, f"'category': expected a non-empty list, got {path!r}"
    else:
        return None, "missing field 'categories'"
    last = path[-1]
    if not isinstance(last, str) or not last.strip():
        return None, f"expected the last element of the category path to be a non-empty string, got {last!r}"
    return last.strip(), ""


def read_amazon(
    reviews: str | Path,
    meta: str | Path,
    *,
    log: ErrorLog,
    unknown_meta: str = "ignore",
    category_path: str = "first",
    progress: bool = False,
) -> SourceData:
    """Parse the two files into behaviours (see the module docstring).

    Raises:
        PrepareError: a missing/unreadable file, or a bad line under ``on_error="raise"``.
    """
    if unknown_meta not in UNKNOWN_META_CHOICES:
        raise ValueError(f"unknown_meta: expected one of {list(UNKNOWN_META_CHOICES)}, got {unknown_meta!r}")
    if category_path not in CATEGORY_PATH_CHOICES:
        raise ValueError(
            f"category_path: expected one of {list(CATEGORY_PATH_CHOICES)}, got {category_path!r}"
        )
    from tqdm import tqdm

    reviews = require_file(reviews, "Amazon reviews, one JSON object per line")
    meta = require_file(meta, "Amazon product metadata, one object per line")
    users, items = Interner(), Interner()
    u_codes, i_codes, times = array("q"), array("q"), array("q")
    first_line: dict[int, int] = {}  # item code -> line of its first review
    review_lines = blank = 0
    for lineno, raw in tqdm(
        iter_lines(reviews, "Amazon reviews, one JSON object per line"),
        desc="reviews",
        unit=" lines",
        disable=not progress,
    ):
        review_lines += 1
        if not raw.strip():
            blank += 1
            continue
        try:
            obj = parse_record(raw)
        except _Unparsable as e:
            log.report(reviews, lineno, "malformed_line", str(e))
            continue
        if not isinstance(obj, dict):
            log.report(reviews, lineno, "malformed_line", f"expected an object, got {type(obj).__name__}")
            continue
        missing = [k for k in ("reviewerID", "asin", "unixReviewTime") if obj.get(k) is None]
        if missing:
            log.report(reviews, lineno, "missing_field", f"missing field {missing[0]!r}")
            continue
        user, item, ts = obj["reviewerID"], obj["asin"], _timestamp(obj["unixReviewTime"])
        if not isinstance(user, str) or not user or not isinstance(item, str) or not item:
            log.report(reviews, lineno, "bad_value", "expected non-empty strings in 'reviewerID' and 'asin'")
            continue
        if ts is None:
            log.report(
                reviews,
                lineno,
                "bad_value",
                f"'unixReviewTime': expected integer seconds, got {obj['unixReviewTime']!r}",
            )
            continue
        code = items.code(item)
        first_line.setdefault(code, lineno)
        u_codes.append(users.code(user))
        i_codes.append(code)
        times.append(ts)

    # Meta: the category of every reviewed item.
    category_of: dict[str, str] = {}
    meta_line: dict[str, int] = {}
    unused = meta_lines = meta_blank = 0
    for lineno, raw in tqdm(
        iter_lines(meta, "Amazon product metadata, one object per line"),
        desc="meta",
        unit=" lines",
        disable=not progress,
    ):
        meta_lines += 1
        if not raw.strip():
            meta_blank += 1
            continue
        m = _ASIN.search(raw)
        if m is not None and unknown_meta == "ignore":
            try:
                asin_fast = m.group(1).decode("utf-8")
            except UnicodeDecodeError:
                asin_fast = None
            if asin_fast is not None and asin_fast not in items:
                unused += 1
                continue
        try:
            obj = parse_record(raw)
        except _Unparsable as e:
            log.report(meta, lineno, "malformed_line", str(e))
            continue
        if not isinstance(obj, dict):
            log.report(meta, lineno, "malformed_line", f"expected an object, got {type(obj).__name__}")
            continue
        asin = obj.get("asin")
        if asin is None:
            log.report(meta, lineno, "missing_field", "missing field 'asin'")
            continue
        if not isinstance(asin, str) or not asin:
            log.report(meta, lineno, "bad_value", f"'asin': expected a non-empty string, got {asin!r}")
            continue
        if asin not in items:
            if unknown_meta == "error":
                log.report(
                    meta,
                    lineno,
                    "unknown_item",
                    f"meta entry for item {asin!r}, which has no review in {reviews}",
                )
            else:
                unused += 1
            continue
        if asin in category_of or asin in meta_line:
            log.report(
                meta,
                lineno,
                "duplicate_meta",
                f"second entry for item {asin!r} (first at line {meta_line[asin]})",
            )
            continue
        meta_line[asin] = lineno
        cat, problem = _category(obj, category_path)
        if cat is None:
            reason = "missing_field" if problem.startswith("missing") else "bad_value"
            log.report(meta, lineno, reason, f"item {asin!r}: {problem}")
            continue
        category_of[asin] = cat

    # Reviews of items without a category.
    u = np.frombuffer(u_codes, dtype=np.int64)
    i = np.frombuffer(i_codes, dtype=np.int64)
    t = np.frombuffer(times, dtype=np.int64)
    item_raw = items.raw_values()
    has_cat = np.fromiter((a in category_of for a in item_raw), dtype=bool, count=len(item_raw))
    if not has_cat.all():
        reviews_per_code = np.bincount(i, minlength=len(item_raw))
        for code in sorted(np.flatnonzero(~has_cat).tolist(), key=first_line.__getitem__):
            log.report(
                reviews,
                first_line[code],
                "item_without_meta",
                f"item {item_raw[code]!r} (first review on this line) has no meta entry with a category in {meta}",
                count=int(reviews_per_code[code]),
            )
        keep = has_cat[i]
        u, i, t = u[keep], i[keep], t[keep]

    # Contiguous ids over the kept behaviours only, in sorted order of the raw ids.
    user_ids, user_vocab = users.ids(u)
    item_ids, item_vocab = items.ids(i)
    cats = Interner()
    cat_codes = np.fromiter((cats.code(category_of[a]) for a in item_vocab), np.int64, len(item_vocab))
    cat_ids, cat_vocab = cats.ids(cat_codes)
    item_category = np.zeros(len(item_vocab) + 1, dtype=np.int64)
    item_category[1:] = cat_ids

    return SourceData(
        name="amazon",
        user=user_ids,
        item=item_ids,
        timestamp=t,
        item_category=item_category,
        vocab={"user": user_vocab, "item": item_vocab, "category": cat_vocab},
        files={"reviews": str(reviews), "meta": str(meta)},
        counts={"review_lines": review_lines, "meta_lines": meta_lines},
        ignored={"blank_lines": blank + meta_blank, "meta_without_reviews": unused},
        options={"unknown_meta": unknown_meta, "category_path": category_path},
        hints=TrainingHints(
            embedding_dim=64,
            max_history=100,
            batch_size=1024,
            eval_batch_size=4096,
            comment="Sizes follow the DIN paper's Amazon set-up: item and category embeddings of 64 (the DIN "
            "repository's hidden_units=128 split over the two), attention MLP 80-40, top MLP 200-80.",
        ),
        category_rule=f"last element of the {category_path} path of the meta entry's 'categories' (2018 files: "
        "of 'category')",
    )
