"""``prepare movielens``: ml-100k and ml-1m folders, the rating threshold, profiles, bad input."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from din_torchrec.config import load_config
from din_torchrec.data.prepare import PrepareError, prepare_movielens
from din_torchrec.data.prepare.movielens import ML100K_GENRES, ML100K_OCCUPATIONS
from tests.data.prepare.helpers import (
    check_protocol,
    item_categories,
    vocab,
    write_lines,
    write_ml1m,
    write_ml100k,
)


def _ratings(n_users: int = 20, n_movies: int = 40, seed: int = 0) -> list[tuple[int, int, int, int]]:
    rnd = random.Random(seed)
    out = []
    for u in range(1, n_users + 1):
        movies = rnd.sample(range(1, n_movies + 1), rnd.randint(1, 12))
        t = 880_000_000 + rnd.randrange(10**6)
        for m in movies:
            t += rnd.choice([0, 1, 300])
            out.append((u, m, rnd.randint(1, 5), t))
    rnd.shuffle(out)
    return out


def test_ml100k(tmp_path: Path) -> None:
    ratings = _ratings(seed=1)
    rnd = random.Random(2)
    genres = {m: sorted(rnd.sample(range(19), rnd.randint(1, 3))) for m in range(1, 46)}  # 41..45 unrated
    users = {u: (10 + 3 * u, "MF"[u % 2], ML100K_OCCUPATIONS[u % 21]) for u in range(1, 21)}
    d = write_ml100k(tmp_path / "ml-100k", ratings, genres, users)
    out = tmp_path / "out"
    meta = prepare_movielens(tmp_path, out)  # the parent folder: its ml-100k child is found
    check_protocol(out, [(u, m, t) for u, m, _, t in ratings])
    items, cats, cate = vocab(out, "item"), vocab(out, "category"), item_categories(out)
    assert all(cats[int(cate[i])] == ML100K_GENRES[genres[m][0]] for i, m in items.items()), (
        "first genre flag"
    )
    assert meta["source"]["options"]["variant"] == "ml-100k" and meta["source"]["files"]["ratings"] == str(
        d / "u.data"
    )
    assert meta["ignored"]["meta_without_reviews"] == len(genres) - len(items)
    # Profile columns, from u.user: age buckets cut at 18/25/35/45/50/56, F=0/M=1, occupations by name.
    rows = pq.read_table(out / "test").to_pylist()
    user_raw = vocab(out, "user")
    for r in rows:
        age, g, occ = users[user_raw[r["user_id"]]]
        assert r["user_age"] == sum(age >= b for b in (18, 25, 35, 45, 50, 56))
        assert r["user_gender"] == "FM".index(g) and r["user_occupation"] == ML100K_OCCUPATIONS.index(occ)
    # Profile frequencies: one per train sample.
    train = pq.read_table(out / "train").to_pylist()
    with np.load(out / "frequencies.npz") as z:
        for table, column, size in (
            ("age", "user_age", 7),
            ("gender", "user_gender", 2),
            ("occupation", "user_occupation", 21),
        ):
            expected = np.bincount([r[column] for r in train], minlength=size)
            np.testing.assert_array_equal(z[table], expected, err_msg=f"frequencies[{table!r}]")
    cfg = load_config(out / "experiment.yaml")
    assert [(p.name, p.num_embeddings, p.column) for p in cfg.features.profile] == [
        ("user", len(user_raw) + 1, "user_id"),
        ("age", 7, "user_age"),
        ("gender", 2, "user_gender"),
        ("occupation", 21, "user_occupation"),
    ]


def test_ml1m_threshold_without_users_file(tmp_path: Path) -> None:
    ratings = _ratings(seed=3)
    genres = {
        m: ["Comedy|Drama", "Action|Thriller", "Children's", "Film-Noir|Drama"][m % 4] for m in range(1, 41)
    }
    write_ml1m(tmp_path / "ml-1m", ratings, genres)
    out = tmp_path / "out"
    meta = prepare_movielens(tmp_path / "ml-1m", out, min_rating=4, protocol="dien", layout="flat")
    kept = [(u, m, t) for u, m, r, t in ratings if r >= 4]
    check_protocol(out, kept, "dien")
    assert meta["ignored"]["below_min_rating"] == len(ratings) - len(kept)
    items, cats, cate = vocab(out, "item"), vocab(out, "category"), item_categories(out)
    assert all(cats[int(cate[i])] == genres[m].split("|")[0] for i, m in items.items()), "first listed genre"
    assert "user_age" not in pq.read_schema(out / "test" / "part-00000.parquet").names


def test_not_a_movielens_folder(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(PrepareError, match=r"x: not a MovieLens folder"):
        prepare_movielens(tmp_path / "x", tmp_path / "out")
    (tmp_path / "y").mkdir()
    write_lines(tmp_path / "y" / "ratings.dat", ["1::2::3::4"])
    with pytest.raises(PrepareError, match=r"movies\.dat: file does not exist"):
        prepare_movielens(tmp_path / "y", tmp_path / "out")
    with pytest.raises(PrepareError, match=r"nope: folder does not exist"):
        prepare_movielens(tmp_path / "nope", tmp_path / "out")


def _bad(tmp_path: Path, case: str):
    ratings = _ratings(n_users=8, n_movies=30, seed=4)
    lines = [f"{u}::{m}::{r}::{t}" for u, m, r, t in ratings]
    genres = {m: "Comedy|Drama" for m in range(1, 31)}
    users = {u: ("F", 25, 3) for u in range(1, 9)}
    d = write_ml1m(tmp_path / "ml-1m", ratings, genres, users)
    if case == "fields":
        lines.insert(2, "1::2::3")
        file, line, reason, count = "ratings.dat", 3, "malformed_line", 1
    elif case == "value":
        lines.insert(0, "1::x::3::4")
        file, line, reason, count = "ratings.dat", 1, "bad_value", 1
    elif case == "no_genre":
        m = ratings[0][1]
        movie_lines = [f"{k}::T::{'' if k == m else g}" for k, g in genres.items()]
        write_lines(d / "movies.dat", movie_lines)
        file, line, reason, count = "movies.dat", list(genres).index(m) + 1, "missing_field", 1
    elif case == "unknown_movie":
        lines.insert(4, f"{ratings[0][0]}::999::5::1")
        file, line, reason, count = "ratings.dat", 5, "item_without_meta", 1
    elif case == "unknown_user":
        lines.insert(1, "77::1::5::1")
        lines.insert(2, "77::2::5::2")
        file, line, reason, count = "ratings.dat", 2, "user_without_profile", 2
    else:  # pragma: no cover
        raise AssertionError(case)
    write_lines(d / "ratings.dat", lines)
    return d, file, line, reason, count


@pytest.mark.parametrize("case", ["fields", "value", "no_genre", "unknown_movie", "unknown_user"])
def test_bad_lines(tmp_path: Path, case: str) -> None:
    d, file, line, reason, count = _bad(tmp_path, case)
    with pytest.raises(PrepareError, match=rf"{file}:{line}: "):
        prepare_movielens(d, tmp_path / "out")
    meta = prepare_movielens(d, tmp_path / "out", on_error="skip")
    assert meta["skipped"][file][reason]["count"] == count
    assert meta["skipped"][file][reason]["first"].startswith(f"{d / file}:{line}: ")
