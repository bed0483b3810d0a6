"""MovieLens ml-100k and ml-1m, as unpacked from the GroupLens zip files (the folder is detected).

* **ml-100k**: ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``), ``u.item`` (``|``-separated:
  id, title, release date, video release date, IMDb URL, then 19 genre flags in the order of
  :data:`ML100K_GENRES`; latin-1), optional ``u.user`` (``id|age|gender|occupation|zip``).
  **An item's category is its first genre flag set**, in that order (``unknown`` first).
* **ml-1m**: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``), ``movies.dat``
  (``MovieID::Title::Genres``, genres ``|``-separated; latin-1), optional ``users.dat``
  (``UserID::Gender::Age::Occupation::Zip-code``). **An item's category is its first listed genre.**
* A rating is a behaviour; with ``min_rating`` only ratings ``>= min_rating`` are (the others are counted
  under ``ignored.below_min_rating``). Movies listed without a (kept) rating are counted under
  ``ignored.meta_without_reviews``.
* **Profile columns** (when the users file is present): ``user_age`` (7 buckets, ml-1m's:
  :data:`AGE_BUCKETS`; ml-100k's raw ages are cut at the same bounds), ``user_gender`` (``F`` = 0,
  ``M`` = 1) and ``user_occupation`` (ml-1m's codes 0..20; ml-100k's names in alphabetical order, 0..20).
  Without the users file the samples hold ``user_id`` only.

Bad lines (``on_error``): wrong number of fields (``malformed_line``), a non-numeric id, rating or timestamp
or an unknown flag/gender/occupation (``bad_value``), a movie without a genre (``missing_field``), a second
line of one movie or user (``duplicate_meta``), a rating of a movie missing from the movie file
(``item_without_meta``: named at its first rating; skip drops its ratings), a rated user missing from the
users file (``user_without_profile``: likewise).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from din_torchrec.data.prepare.core import Interner, ProfileColumn, SourceData, TrainingHints
from din_torchrec.data.prepare.errors import ErrorLog, PrepareError
from din_torchrec.data.prepare.textio import iter_lines

__all__ = ["AGE_BUCKETS", "ML100K_GENRES", "ML100K_OCCUPATIONS", "detect_movielens", "read_movielens"]

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
ML100K_OCCUPATIONS = (
    "administrator", "artist", "doctor", "educator", "engineer", "entertainment", "executive", "healthcare",
    "homemaker", "lawyer", "librarian", "marketing", "none", "other", "programmer", "retired", "salesman",
    "scientist", "student", "technician", "writer",
)  # fmt: skip
ML1M_OCCUPATIONS = (
    "other or not specified", "academic/educator", "artist", "clerical/admin", "college/grad student",
    "customer service", "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student",
    "lawyer", "programmer", "retired", "sales/marketing", "scientist", "self-employed",
    "technician/engineer", "tradesman/craftsman", "unemployed", "writer",
)  # fmt: skip
#: ml-1m's age codes (the lower bound of each bucket) and their labels.
AGE_BUCKETS = (
    (1, "Under 18"),
    (18, "18-24"),
    (25, "25-34"),
    (35, "35-44"),
    (45, "45-49"),
    (50, "50-55"),
    (56, "56+"),
)
GENDERS = ("F", "M")

_LAYOUTS = {
    "ml-100k": {"ratings": "u.data", "movies": "u.item", "users": "u.user"},
    "ml-1m": {"ratings": "ratings.dat", "movies": "movies.dat", "users": "users.dat"},
}


def detect_movielens(directory: str | Path) -> tuple[str, Path]:
    """``("ml-100k" | "ml-1m", folder)`` from the files present in ``directory`` (or its one ``ml-*`` child).

    Raises:
        PrepareError: the folder is missing or holds neither layout.
    """
    d = Path(directory)
    if not d.is_dir():
        raise PrepareError(f"{d}: folder does not exist (expected an unpacked ml-100k or ml-1m folder)")
    for candidate in [d, *sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("ml-"))]:
        for name, files in _LAYOUTS.items():
            if (candidate / files["ratings"]).exists() or (candidate / files["movies"]).exists():
                for role in ("ratings", "movies"):
                    if not (candidate / files[role]).is_file():
                        raise PrepareError(
                            f"{candidate / files[role]}: file does not exist (a {name} folder needs "
                            f"{files['ratings']} and {files['movies']})"
                        )
                return name, candidate
    raise PrepareError(
        f"{d}: not a MovieLens folder: expected u.data + u.item (ml-100k) or ratings.dat + movies.dat (ml-1m)"
    )


def _fields(
    path: Path, sep: bytes, encoding: str, what: str, log: ErrorLog
) -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` of the non-blank lines; undecodable lines are reported as malformed."""
    for lineno, raw in iter_lines(path, what):
        if not raw.strip():
            continue
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as e:
            log.report(path, lineno, "malformed_line", f"not {encoding} text ({e.reason})")
            continue
        yield lineno, text.split(sep.decode())


def _int(text: str) -> int | None:
    t = text.strip()
    return int(t) if t.lstrip("-").isdigit() else None


def _parse_ratings(
    path: Path, sep: bytes, min_rating: float | None, log: ErrorLog
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, int]:
    """``(user raw ids, movie raw ids, timestamps, line numbers, lines, below threshold)`` of the behaviours."""
    users, movies, times, lines = array("q"), array("q"), array("q"), array("q")
    below = total = 0
    for lineno, f in _fields(path, sep, "latin-1", "MovieLens ratings", log):
        total += 1
        if len(f) != 4:
            log.report(
                path,
                lineno,
                "malformed_line",
                f"expected 4 fields (user, item, rating, timestamp), got {len(f)}",
            )
            continue
        u, m, t = _int(f[0]), _int(f[1]), _int(f[3])
        try:
            r = float(f[2])
        except ValueError:
            r = None
        if u is None or m is None or t is None or r is None:
            log.report(
                path, lineno, "bad_value", f"expected integer ids and timestamp and a numeric rating, got {f}"
            )
            continue
        if min_rating is not None and r < min_rating:
            below += 1
            continue
        users.append(u)
        movies.append(m)
        times.append(t)
        lines.append(lineno)
    as_np = [np.array(a, dtype=np.int64) for a in (users, movies, times, lines)]
    return as_np[0], as_np[1], as_np[2], as_np[3], total, below


def _parse_movies(path: Path, variant: str, log: ErrorLog) -> tuple[dict[int, str], int]:
    """``({movie raw id: category name}, lines)``."""
    genre_of: dict[int, str] = {}
    line_of: dict[int, int] = {}
    total = 0
    sep = b"|" if variant == "ml-100k" else b"::"
    for lineno, f in _fields(path, sep, "latin-1", "MovieLens movies", log):
        total += 1
        if variant == "ml-100k":
            if len(f) != 5 + len(ML100K_GENRES):
                log.report(
                    path,
                    lineno,
                    "malformed_line",
                    f"expected {5 + len(ML100K_GENRES)} '|'-separated fields, got {len(f)}",
                )
                continue
            flags = [x.strip() for x in f[5:]]
            if any(x not in ("0", "1") for x in flags):
                log.report(path, lineno, "bad_value", f"expected genre flags 0 or 1, got {flags}")
                continue
            genre = ML100K_GENRES[flags.index("1")] if "1" in flags else None
        else:
            if len(f) < 3:
                log.report(
                    path,
                    lineno,
                    "malformed_line",
                    f"expected 3 '::'-separated fields (id, title, genres), got {len(f)}",
                )
                continue
            first = f[-1].split("|")[0].strip()
            genre = first or None
        movie = _int(f[0])
        if movie is None:
            log.report(path, lineno, "bad_value", f"expected an integer movie id, got {f[0]!r}")
            continue
        if movie in line_of:
            log.report(
                path,
                lineno,
                "duplicate_meta",
                f"second line of movie {movie} (first at line {line_of[movie]})",
            )
            continue
        line_of[movie] = lineno
        if genre is None:
            log.report(path, lineno, "missing_field", f"movie {movie} has no genre")
            continue
        genre_of[movie] = genre
    return genre_of, total


def _parse_users(path: Path, variant: str, log: ErrorLog) -> dict[int, tuple[int, int, int]]:
    """``{user raw id: (age bucket, gender, occupation)}``."""
    out: dict[int, tuple[int, int, int]] = {}
    line_of: dict[int, int] = {}
    bounds = np.array([a for a, _ in AGE_BUCKETS[1:]])
    sep = b"|" if variant == "ml-100k" else b"::"
    for lineno, f in _fields(path, sep, "latin-1", "MovieLens users", log):
        if len(f) != 5:
            log.report(path, lineno, "malformed_line", f"expected 5 fields, got {len(f)}")
            continue
        if variant == "ml-100k":
            user, age_raw, gender, occ_raw = _int(f[0]), _int(f[1]), f[2].strip(), f[3].strip()
            occupation = ML100K_OCCUPATIONS.index(occ_raw) if occ_raw in ML100K_OCCUPATIONS else None
        else:
            user, gender, age_raw, occ = _int(f[0]), f[1].strip(), _int(f[2]), _int(f[3])
            occupation = occ if occ is not None and 0 <= occ < len(ML1M_OCCUPATIONS) else None
        if user is None or age_raw is None or gender not in GENDERS or occupation is None:
            log.report(
                path, lineno, "bad_value", f"expected id, age, gender (F/M) and a known occupation, got {f}"
            )
            continue
        if user in line_of:
            log.report(
                path, lineno, "duplicate_meta", f"second line of user {user} (first at line {line_of[user]})"
            )
            continue
        line_of[user] = lineno
        age = int(np.searchsorted(bounds, age_raw, side="right"))
        out[user] = (age, GENDERS.index(gender), occupation)
    return out


def _drop_unknown(
    keys: np.ndarray,
    known: Callable[[int], bool],
    lines: np.ndarray,
    path: Path,
    reason: str,
    message: Callable[[int], str],
    log: ErrorLog,
) -> np.ndarray:
    """Mask of the rows whose key is known; each unknown key reported once, at its first line."""
    uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
    ok = np.fromiter((known(int(k)) for k in uniq), dtype=bool, count=len(uniq))
    for j in sorted(np.flatnonzero(~ok).tolist(), key=lambda j: lines[first[j]]):
        log.report(path, int(lines[first[j]]), reason, message(int(uniq[j])), count=int(counts[j]))
    return ok[np.searchsorted(uniq, keys)] if len(keys) else np.ones(0, dtype=bool)


def read_movielens(
    directory: str | Path, *, log: ErrorLog, min_rating: float | None = None, progress: bool = False
) -> SourceData:
    """Parse an ml-100k or ml-1m folder into behaviours (see the module docstring)."""
    variant, d = detect_movielens(directory)
    files = {role: d / name for role, name in _LAYOUTS[variant].items()}
    sep = b"\t" if variant == "ml-100k" else b"::"
    users, movies, times, lines, n_ratings, below = _parse_ratings(files["ratings"], sep, min_rating, log)
    genre_of, n_movies = _parse_movies(files["movies"], variant, log)
    profiles = _parse_users(files["users"], variant, log) if files["users"].is_file() else None

    keep = _drop_unknown(
        movies,
        genre_of.__contains__,
        lines,
        files["ratings"],
        "item_without_meta",
        lambda m: f"movie {m} (first rating on this line) has no line with a genre in {files['movies']}",
        log,
    )
    users, movies, times, lines = users[keep], movies[keep], times[keep], lines[keep]
    if profiles is not None:
        keep = _drop_unknown(
            users,
            profiles.__contains__,
            lines,
            files["ratings"],
            "user_without_profile",
            lambda u: f"user {u} (first rating on this line) has no line in {files['users']}",
            log,
        )
        users, movies, times = users[keep], movies[keep], times[keep]

    user_uniq = np.unique(users)
    item_uniq, item_inv = np.unique(movies, return_inverse=True)
    cats = Interner()
    cat_codes = np.fromiter((cats.code(genre_of[int(m)]) for m in item_uniq), np.int64, len(item_uniq))
    cat_ids, cat_vocab = cats.ids(cat_codes)
    item_category = np.zeros(len(item_uniq) + 1, dtype=np.int64)
    item_category[1:] = cat_ids

    profile: dict[str, ProfileColumn] = {}
    if profiles is not None:
        table = np.zeros((len(user_uniq) + 1, 3), dtype=np.int64)
        if len(user_uniq):
            table[1:] = np.array([profiles[int(u)] for u in user_uniq.tolist()], dtype=np.int64)
        occupations = ML100K_OCCUPATIONS if variant == "ml-100k" else ML1M_OCCUPATIONS
        profile = {
            "user_age": ProfileColumn(
                "age", table[:, 0], len(AGE_BUCKETS), [label for _, label in AGE_BUCKETS]
            ),
            "user_gender": ProfileColumn("gender", table[:, 1], len(GENDERS), list(GENDERS)),
            "user_occupation": ProfileColumn("occupation", table[:, 2], len(occupations), list(occupations)),
        }
    used_movies = set(item_uniq.tolist())
    return SourceData(
        name=f"movielens-{variant[3:]}",
        user=(np.searchsorted(user_uniq, users) + 1).astype(np.int64),
        item=(item_inv.reshape(-1) + 1).astype(np.int64),
        timestamp=times,
        item_category=item_category,
        vocab={"user": user_uniq.tolist(), "item": item_uniq.tolist(), "category": cat_vocab},
        profile=profile,
        files={role: str(p) for role, p in files.items() if p.is_file()},
        counts={"rating_lines": n_ratings, "movie_lines": n_movies},
        ignored={
            "below_min_rating": below,
            "meta_without_reviews": sum(1 for m in genre_of if m not in used_movies),
        },
        options={"variant": variant, "min_rating": min_rating, "profile": profiles is not None},
        hints=TrainingHints(embedding_dim=32, max_history=100, batch_size=1024, eval_batch_size=4096),
        category_rule=(
            "first genre flag set in u.item (genre order of the ml-100k README)"
            if variant == "ml-100k"
            else "first genre listed in movies.dat"
        ),
    )
