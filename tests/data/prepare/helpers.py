"""Tiny files in the public formats, and a plain-Python view of a prepared dataset.

The writers produce exactly what the downloads look like (Amazon JSON / Python-literal lines, MovieLens'
``\\t`` / ``|`` / ``::`` files, Taobao's CSV); the loader reads a prepared folder of either layout back into
plain dicts with the *raw* ids (through ``vocab/``), so the tests compare against plain-Python references
built from the raw records, never against the converter's own arrays.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

# --------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str], gz: bool = False, encoding: str = "utf-8") -> Path:
    data = "".join(line + "\n" for line in lines).encode(encoding)
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return path


def random_reviews(
    n_users: int = 25, n_items: int = 40, seed: int = 0, max_per_user: int = 9
) -> tuple[list[dict[str, Any]], list[str]]:
    """Review records (with ties in time and one repeated user-item pair) and the item asins."""
    rnd = random.Random(seed)
    asins = [f"B{rnd.randrange(10**8):08d}X{i}" for i in range(n_items)]
    reviews = []
    for u in range(n_users):
        uid = f"A{rnd.randrange(10**6):06d}U{u}"
        for _ in range(rnd.randint(1, max_per_user)):
            reviews.append(
                {
                    "reviewerID": uid,
                    "asin": rnd.choice(asins),
                    "reviewerName": "x",
                    "helpful": [0, 0],
                    "reviewText": "fine",
                    "overall": 5.0,
                    "summary": "s",
                    "unixReviewTime": 1_300_000_000 + 86400 * rnd.randint(0, 30),
                    "reviewTime": "01 1, 2011",
                }
            )
    rnd.shuffle(reviews)
    return reviews, asins


def meta_entries(asins: list[str], n_categories: int = 6, extra: int = 5) -> list[dict[str, Any]]:
    """Meta records for ``asins`` plus ``extra`` products nobody reviewed."""
    out = []
    for i, a in enumerate([*asins, *[f"Z{j:09d}" for j in range(extra)]]):
        out.append(
            {
                "asin": a,
                "title": f'Product {i} "quoted" it\'s',
                "price": 9.99,
                "related": {"also_bought": [asins[0]]},
                "categories": [["Electronics", "Sub", f"Leaf {i % n_categories}"], ["Other", "Ignored"]],
            }
        )
    return out


def write_amazon(
    d: Path,
    reviews: list[dict[str, Any]],
    meta: list[dict[str, Any]],
    *,
    gz: bool = False,
    literal_meta: bool = True,
) -> tuple[Path, Path]:
    """``reviews_X_5.json(.gz)`` (strict JSON) and ``meta_X.json(.gz)`` (Python literals or JSON)."""
    suffix = ".json.gz" if gz else ".json"
    r = write_lines(d / f"reviews_X_5{suffix}", [json.dumps(x) for x in reviews], gz)
    m = write_lines(d / f"meta_X{suffix}", [repr(x) if literal_meta else json.dumps(x) for x in meta], gz)
    return r, m


ML100K_GENRE_COUNT = 19


def write_ml100k(d: Path, ratings: list[tuple[int, int, int, int]], genres: dict[int, list[int]], users=None):
    """``u.data``, ``u.item`` (genre flags from the genre indices), optional ``u.user``."""
    d.mkdir(parents=True, exist_ok=True)
    write_lines(d / "u.data", [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in ratings])
    lines = []
    for movie, gs in genres.items():
        flags = ["1" if g in gs else "0" for g in range(ML100K_GENRE_COUNT)]
        lines.append("|".join([str(movie), f"Movie {movie} (1995)", "01-Jan-1995", "", "http://x", *flags]))
    write_lines(d / "u.item", lines, encoding="latin-1")
    if users is not None:
        write_lines(d / "u.user", [f"{u}|{a}|{g}|{o}|12345" for u, (a, g, o) in users.items()])
    return d


def write_ml1m(d: Path, ratings: list[tuple[int, int, int, int]], genres: dict[int, str], users=None):
    """``ratings.dat``, ``movies.dat`` (latin-1, a title with a non-ASCII letter), optional ``users.dat``."""
    d.mkdir(parents=True, exist_ok=True)
    write_lines(d / "ratings.dat", [f"{u}::{i}::{r}::{t}" for u, i, r, t in ratings])
    write_lines(
        d / "movies.dat",
        [f"{m}::Caf\u00e9 {m} (1999)::{g}" for m, g in genres.items()],
        encoding="latin-1",
    )
    if users is not None:
        write_lines(d / "users.dat", [f"{u}::{g}::{a}::{o}::12345" for u, (g, a, o) in users.items()])
    return d


def random_taobao(
    n_users: int = 30, n_items: int = 50, seed: int = 0
) -> list[tuple[int, int, int, str, int]]:
    """Taobao lines: clicks with repeats and ties, plus buy/cart/fav lines; item -> category fixed."""
    rnd = random.Random(seed)
    cat = {i: 1000 + rnd.randrange(7) for i in range(n_items)}
    rows = []
    for _ in range(n_users):
        u = rnd.randrange(10**6)
        t = 1_511_500_000 + rnd.randrange(10_000)
        for _ in range(rnd.randint(1, 12)):
            item = 10**5 + rnd.randrange(n_items)
            t += rnd.choice([0, 5, 60, 4000])
            rows.append((u, item, cat[item - 10**5], rnd.choice(["pv"] * 6 + ["buy", "cart", "fav"]), t))
    rnd.shuffle(rows)
    return rows


def write_taobao(path: Path, rows: list[tuple[Any, ...]], gz: bool = False) -> Path:
    return write_lines(path, [",".join(str(x) for x in r) for r in rows], gz)


# --------------------------------------------------------------------------------------------------------
# Reading a prepared folder back
# --------------------------------------------------------------------------------------------------------


def vocab(out: Path, table: str) -> dict[int, Any]:
    t = pq.read_table(out / "vocab" / f"{table}.parquet").to_pydict()
    return dict(zip(t["id"], t["raw"]))


def load_split(out: Path, split: str) -> list[dict[str, Any]]:
    """Sample rows of ``split`` as dicts with their full history lists (ids, not raw), either layout."""
    meta = json.loads((out / "meta.json").read_text())
    rows = pq.read_table(out / split).to_pylist()
    if meta["layout"] == "flat":
        return rows
    hist = pq.read_table(out / meta["histories"]).to_pylist()
    by_user = {h["user_id"]: h for h in hist}
    for r in rows:
        h = by_user[r["user_id"]]
        a, b = r.pop("hist_begin"), r.pop("hist_end")
        r["_end"] = b
        for c in ("hist_item_ids", "hist_cate_ids", "hist_timestamps"):
            r[c] = h[c][a:b]
    return rows


def item_categories(out: Path) -> np.ndarray:
    with np.load(out / "item_features.npz") as z:
        return z["category"]


def file_bytes(out: Path) -> dict[str, bytes]:
    """Every file below ``out`` (relative path -> bytes)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def reference_positives(
    behaviours: list[tuple[Any, Any, int]], protocol: str = "din", max_history: int = 0
) -> dict[str, set[tuple[Any, tuple[Any, ...], Any, int]]]:
    """The protocol in plain Python from raw ``(user, item, time)`` in input order: ``{"train": {...},
    "test": {...}}`` of ``(user, history items, target item, target time)``, repeats of a user-item pair
    dropped (first kept)."""
    per_user: dict[Any, list[tuple[int, int, Any]]] = {}
    for line, (u, i, t) in enumerate(behaviours):
        per_user.setdefault(u, []).append((t, line, i))
    out: dict[str, set] = {"train": set(), "test": set()}
    for u, seq in per_user.items():
        seq.sort()
        seen, items, times = set(), [], []
        for t, _, i in seq:
            if i not in seen:
                seen.add(i)
                items.append(i)
                times.append(t)
        n = len(items)
        for k in range(1, n):
            if protocol == "din":
                split = "test" if k == n - 1 else "train"
            else:
                split = "test" if k == n - 1 else ("train" if k == n - 2 else None)
            if split is None:
                continue
            lo = max(0, k - max_history) if max_history else 0
            out[split].add((u, tuple(items[lo:k]), items[k], times[k]))
    return out


def check_protocol(out: Path, behaviours: list[tuple[Any, Any, int]], protocol: str = "din") -> None:
    """The converted folder holds exactly the reference positives, and each negative follows the rules."""
    meta = json.loads((out / "meta.json").read_text())
    users, items = vocab(out, "user"), vocab(out, "item")
    cate = item_categories(out)
    max_history = meta["protocol"]["max_history"]
    expected = reference_positives(behaviours, protocol, max_history)
    owned: dict[Any, set] = {}
    for u, i, _ in behaviours:
        owned.setdefault(u, set()).add(i)
    keys_by_split = {}
    for split in ("train", "test"):
        rows = load_split(out, split)
        got_pos = set()
        pos_keys, neg_keys = [], []
        for r in rows:
            u = users[r["user_id"]]
            hist = tuple(items[i] for i in r["hist_item_ids"])
            target = items[r["target_item_id"]]
            # every history timestamp <= the target's; lists aligned; categories from item_features
            assert all(t <= r["target_timestamp"] for t in r["hist_timestamps"]), "history after its target"
            assert r["hist_timestamps"] == sorted(r["hist_timestamps"]), "history not oldest first"
            assert [int(cate[i]) for i in r["hist_item_ids"]] == r["hist_cate_ids"], "history categories"
            assert int(cate[r["target_item_id"]]) == r["target_cate_id"], "target category"
            assert target not in hist, "a history holds its own target"
            key = (u, hist, r["target_timestamp"])
            if r["label"] == 1.0:
                got_pos.add((u, hist, target, r["target_timestamp"]))
                pos_keys.append(key)
            else:
                assert r["label"] == 0.0
                assert target not in owned[u], f"negative {target} of user {u} is one of the user's items"
                neg_keys.append(key)
        assert got_pos == expected[split], f"{split}: positives differ from the protocol's"
        assert len(pos_keys) == len(got_pos), f"{split}: a positive appears twice"
        assert sorted(pos_keys) == sorted(neg_keys), f"{split}: negatives must pair with positives"
        keys_by_split[split] = {(u, target) for u, _, target, _ in got_pos}  # (user, position)
        if split == "test":
            per_user: dict[Any, int] = {}
            for u, _, _ in pos_keys:
                per_user[u] = per_user.get(u, 0) + 1
            multi = {u for u in owned if len({i for uu, i, _ in behaviours if uu == u}) >= 2}
            assert set(per_user) == multi and set(per_user.values()) == {1}, (
                "every user with >= 2 behaviours needs exactly one positive test sample"
            )
    assert not keys_by_split["train"] & keys_by_split["test"], "train and test share a (user, position)"
