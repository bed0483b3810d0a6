"""Synthetic behaviour logs with planted structure: the project's embedded default dataset.

The generator simulates an e-commerce click log in which *target attention* is the right inductive bias:

* **Items and categories.** ``num_items`` items fall into ``num_categories`` categories of uneven size
  (log-normal weights). Item popularity follows a Zipf law (``zipf_exponent``) over a random ranking, so
  item id carries no information about popularity or category. Each item's category is fixed.
* **Latent space.** Every category has a random unit centroid in ``latent_dim`` dimensions; an item's
  latent vector is ``normalise(centroid + item_noise * noise)``, so items of one category are similar and
  items of different categories are roughly orthogonal. The latent vectors are never written out: the model
  has to rediscover them from co-occurrence with clicks.
* **Users.** ``num_users`` users, each with ``interests_per_user`` distinct interest categories (drawn by
  category popularity), an age bucket, a gender and a small personal click bias. The population is
  deterministic from ``seed`` and shared by the train and the test split.
* **Histories.** A sample group is one user at one moment: a base behaviour sequence of ``max_history``
  behaviours, each with probability ``interest_focus`` an item of one of the user's interests (by popularity
  inside the category), otherwise a globally popular item (noise). Timestamps increase by exponential gaps
  (mean ``mean_gap_seconds``). Each of the group's ``samples_per_user`` samples sees a prefix of the base
  sequence whose length is uniform in ``[min_history, max_history]``, and a different candidate: half from
  the user's interests, half from global popularity.
* **Clicks.** ``s = max_j <v_candidate, v_history_j>``, the similarity of the candidate to its *most
  similar* behaviour (0 for an empty history), and::

      logit = click_sharpness * (s - click_threshold) + click_bias + user_bias + age_effect + gender_effect
      label ~ Bernoulli(sigmoid(logit))

  Only the relevant part of the history matters: averaging the similarity over the whole history (what sum
  or mean pooling sees) predicts clicks clearly worse than the max, which is the gap DIN can exploit over
  the base model. ``click_prob`` (the true ``sigmoid(logit)``) is written so tests and reports can compute
  the Bayes-optimal AUC.

Two switchable signals (both off by default; the default output is unchanged by their code) each plant the
premise of a successor model. Either, or both, may be on:

* **Interest drift** (``drift``; DIEN's premise). Every user has ``drift_phases`` disjoint interest sets of
  ``interests_per_user`` categories (from a world stream of their own). A group's base sequence is cut by
  position into ``drift_phases`` equal phases and phase ``p`` draws its interest behaviours from set
  ``(rotation + p) mod drift_phases`` (``rotation`` random per group, so the user id does not tell the
  current set). A row's *current* phase is that of its last behaviour; an interest candidate comes from an
  older phase with probability ``drift_old_share`` (if the prefix has one), else from the current one.
  Without sessions the click score looks at the recent behaviours only:
  ``s = max_{j in the last drift_recent behaviours} <v_candidate, v_history_j>``. An old-interest
  candidate then matches some behaviour of the history (so an order-blind max or attention sees a match)
  but none of the recent ones, and is rarely clicked.
* **Sessions** (``sessions``; DSIN's premise). The base sequence is cut into sessions of
  ``session_min_behaviors..session_max_behaviors`` behaviours. Each session has one theme category (an
  interest of the user, of the session's phase under drift, with probability ``interest_focus``, else the
  category of a globally popular item) and all its items come from it. Gaps are
  ``min(floor(Exp(session_inner_gap_seconds)), session_gap_seconds)`` inside a session and
  ``session_gap_seconds + 1 + floor(Exp(session_break_seconds))`` between sessions, so splitting a history
  wherever a gap exceeds ``session_gap_seconds`` recovers the sessions exactly; the target follows the last
  behaviour by an in-session gap. An interest candidate is the theme of a uniformly chosen session of the
  prefix (with drift: of an older phase with probability ``drift_old_share``, else of the current phase).
  With ``n`` the number of sessions about the candidate's category among the last ``session_window``
  sessions of the prefix (0 = all), the click score is ``s = min(n, session_click_cap) / session_click_cap``
  and ``session_click_threshold`` replaces ``click_threshold``. What counts is *sessions*, not behaviours:
  one long session about a theme weighs as much as one short one, so behaviour counts (what flat attention
  sums) only approximate it.

Everything is vectorised numpy over chunks of sample groups; a chunk is at most a few million history cells,
so memory stays bounded however many rows are generated. Each chunk has its own random stream derived from
``(seed, split, chunk index)``, which makes the output identical run to run and independent of
``rows_per_file`` and ``row_group_size``.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from din_torchrec.config import ConfigError, GeneratorConfig
from din_torchrec.utils.io import atomic_replace_dir, atomic_write_json, atomic_write_with

SCHEMA_VERSION = 1

#: The exact column layout of every part file.
SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.int64()),
        pa.field("user_age", pa.int64()),
        pa.field("user_gender", pa.int64()),
        pa.field("hist_item_ids", pa.list_(pa.int64())),
        pa.field("hist_cate_ids", pa.list_(pa.int64())),
        pa.field("hist_timestamps", pa.list_(pa.int64())),
        pa.field("target_item_id", pa.int64()),
        pa.field("target_cate_id", pa.int64()),
        pa.field("target_timestamp", pa.int64()),
        pa.field("label", pa.float32()),
        pa.field("click_prob", pa.float32()),
    ]
)

# Random-stream keys: the world (items, users) and one stream family per split. Distinct keys give
# statistically independent streams from one seed (numpy SeedSequence spawn keys).
_WORLD_STREAM = 0
_SPLIT_STREAMS = {"train": 1, "test": 2}
# The drifting interest sets of the users (only drawn with ``drift`` on).
_DRIFT_WORLD_STREAM = 3

# Upper bound on history cells (rows x max_history) handled per chunk: ~2.5M cells is ~20 MB of int64 ids
# plus ~10 MB of float32 similarities, whatever the dataset size.
_CHUNK_CELLS = 2_500_000
# Group starts are spread over 30 days after ``start_timestamp``.
_TIME_SPAN_SECONDS = 30 * 24 * 3600
# Users are created in blocks so the Gumbel top-k over categories stays small for millions of users.
_USER_BLOCK = 65_536


# --------------------------------------------------------------------------------------------------------
# The world: items, categories, latent vectors and users
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """The static part of the simulation, deterministic from ``cfg.seed``.

    Index 0 of every item/user array is the reserved padding id and holds zeros.

    Attributes:
        item_category: ``[num_items + 1]`` int64, category id (1..num_categories) of each item.
        item_popularity: ``[num_items + 1]`` float64, Zipf weights (unnormalised; 0 at index 0).
        item_vectors: ``[num_items + 1, latent_dim]`` float32, unit latent vectors (row 0 is zeros).
        items_by_category: ``[num_items]`` int64, item ids sorted by category (stable).
        popularity_cumsum: ``[num_items]`` float64, cumulative popularity in ``items_by_category`` order.
        category_start: ``[num_categories + 1]`` float64, popularity mass before each category's block
            (index by category id; index 0 unused).
        category_mass: ``[num_categories + 1]`` float64, popularity mass of each category.
        category_first: ``[num_categories + 1]`` int64, first position of each category's block in
            ``items_by_category``; ``category_last`` the last one (inclusive).
        category_last: ``[num_categories + 1]`` int64.
        user_interests: ``[num_users + 1, interests_per_user]`` int64, interest category ids per user.
        user_age: ``[num_users + 1]`` int64, age bucket.
        user_gender: ``[num_users + 1]`` int64, 0 or 1.
        user_bias: ``[num_users + 1]`` float32, personal click-logit offset.
        age_effect: ``[num_age_buckets]`` float32, click-logit offset per age bucket.
        gender_effect: ``[2]`` float32, click-logit offset per gender.
        user_interest_phases: ``[num_users + 1, drift_phases, interests_per_user]`` int64, the interest sets
            a user drifts through (all distinct categories), only when ``cfg.drift``; else None.
    """

    item_category: np.ndarray
    item_popularity: np.ndarray
    item_vectors: np.ndarray
    items_by_category: np.ndarray
    popularity_cumsum: np.ndarray
    category_start: np.ndarray
    category_mass: np.ndarray
    category_first: np.ndarray
    category_last: np.ndarray
    user_interests: np.ndarray
    user_age: np.ndarray
    user_gender: np.ndarray
    user_bias: np.ndarray
    age_effect: np.ndarray
    gender_effect: np.ndarray
    user_interest_phases: np.ndarray | None = None

    def sample_items(self, categories: np.ndarray | None, u: np.ndarray) -> np.ndarray:
        """Items by popularity, inside ``categories`` where given, else from the whole catalogue.

        Inverse-CDF sampling on one global cumulative array: a category's items are contiguous in
        ``items_by_category``, so sampling inside category ``c`` is sampling the global CDF restricted to
        ``[category_start[c], category_start[c] + category_mass[c])``. One ``searchsorted`` serves both cases.

        Args:
            categories: int64 array of category ids (any shape), or None for global popularity.
            u: float64 uniforms in [0, 1), same shape as ``categories``.

        Returns:
            int64 item ids, same shape as ``u``.
        """
        total = self.popularity_cumsum[-1]
        if categories is None:
            pos = np.searchsorted(self.popularity_cumsum, u * total, side="right")
            pos = np.minimum(pos, len(self.popularity_cumsum) - 1)
        else:
            target = self.category_start[categories] + u * self.category_mass[categories]
            pos = np.searchsorted(self.popularity_cumsum, target, side="right")
            # Floating-point rounding at block edges could step one item outside the category.
            pos = np.clip(pos, self.category_first[categories], self.category_last[categories])
        return self.items_by_category[pos]


def _rng(cfg: GeneratorConfig, *key: int) -> np.random.Generator:
    """An independent random stream for ``key`` under ``cfg.seed``."""
    return np.random.default_rng(np.random.SeedSequence(entropy=cfg.seed, spawn_key=key))


def validate_generator_config(cfg: GeneratorConfig) -> None:
    """Raise ``ValueError`` naming the field when the generator cannot honour ``cfg``."""
    checks: list[tuple[bool, str]] = [
        (cfg.num_users >= 1, f"num_users: expected >= 1, got {cfg.num_users}"),
        (cfg.num_categories >= 1, f"num_categories: expected >= 1, got {cfg.num_categories}"),
        (
            cfg.num_items >= cfg.num_categories,
            f"num_items: expected >= num_categories ({cfg.num_categories}) so no category is empty, "
            f"got {cfg.num_items}",
        ),
        (cfg.train_samples >= 0, f"train_samples: expected >= 0, got {cfg.train_samples}"),
        (cfg.test_samples >= 0, f"test_samples: expected >= 0, got {cfg.test_samples}"),
        (cfg.samples_per_user >= 1, f"samples_per_user: expected >= 1, got {cfg.samples_per_user}"),
        (cfg.min_history >= 0, f"min_history: expected >= 0, got {cfg.min_history}"),
        (
            cfg.max_history >= cfg.min_history,
            f"max_history: expected >= min_history ({cfg.min_history}), got {cfg.max_history}",
        ),
        (
            1 <= cfg.interests_per_user <= cfg.num_categories,
            f"interests_per_user: expected 1..num_categories ({cfg.num_categories}), "
            f"got {cfg.interests_per_user}",
        ),
        (0.0 <= cfg.interest_focus <= 1.0, f"interest_focus: expected in [0, 1], got {cfg.interest_focus}"),
        (cfg.zipf_exponent >= 0.0, f"zipf_exponent: expected >= 0, got {cfg.zipf_exponent}"),
        (cfg.latent_dim >= 1, f"latent_dim: expected >= 1, got {cfg.latent_dim}"),
        (cfg.item_noise >= 0.0, f"item_noise: expected >= 0, got {cfg.item_noise}"),
        (cfg.num_age_buckets >= 1, f"num_age_buckets: expected >= 1, got {cfg.num_age_buckets}"),
        (cfg.rows_per_file >= 1, f"rows_per_file: expected >= 1, got {cfg.rows_per_file}"),
        (cfg.row_group_size >= 1, f"row_group_size: expected >= 1, got {cfg.row_group_size}"),
        (cfg.mean_gap_seconds >= 0.0, f"mean_gap_seconds: expected >= 0, got {cfg.mean_gap_seconds}"),
        (cfg.start_timestamp >= 0, f"start_timestamp: expected >= 0, got {cfg.start_timestamp}"),
        (cfg.seed >= 0, f"seed: expected >= 0, got {cfg.seed}"),
    ]
    if cfg.drift or cfg.sessions:
        checks.append(
            (
                cfg.max_history >= 1,
                f"max_history: expected >= 1 with drift or sessions on, got {cfg.max_history}",
            )
        )
    if cfg.drift:
        checks += [
            (cfg.drift_phases >= 2, f"drift_phases: expected >= 2, got {cfg.drift_phases}"),
            (
                cfg.drift_phases * cfg.interests_per_user <= cfg.num_categories,
                f"drift_phases: drift_phases x interests_per_user ({cfg.interests_per_user}) distinct interest "
                f"categories must fit in num_categories ({cfg.num_categories}), got {cfg.drift_phases}",
            ),
            (cfg.drift_recent >= 1, f"drift_recent: expected >= 1, got {cfg.drift_recent}"),
            (
                0.0 <= cfg.drift_old_share <= 1.0,
                f"drift_old_share: expected in [0, 1], got {cfg.drift_old_share}",
            ),
        ]
    if cfg.sessions:
        checks += [
            (
                cfg.session_gap_seconds >= 0,
                f"session_gap_seconds: expected >= 0, got {cfg.session_gap_seconds}",
            ),
            (
                cfg.session_min_behaviors >= 1,
                f"session_min_behaviors: expected >= 1, got {cfg.session_min_behaviors}",
            ),
            (
                cfg.session_max_behaviors >= cfg.session_min_behaviors,
                f"session_max_behaviors: expected >= session_min_behaviors ({cfg.session_min_behaviors}), "
                f"got {cfg.session_max_behaviors}",
            ),
            (
                cfg.session_inner_gap_seconds >= 0.0,
                f"session_inner_gap_seconds: expected >= 0, got {cfg.session_inner_gap_seconds}",
            ),
            (
                cfg.session_break_seconds >= 0.0,
                f"session_break_seconds: expected >= 0, got {cfg.session_break_seconds}",
            ),
            (cfg.session_window >= 0, f"session_window: expected >= 0, got {cfg.session_window}"),
            (cfg.session_click_cap >= 1, f"session_click_cap: expected >= 1, got {cfg.session_click_cap}"),
            (
                math.isfinite(cfg.session_click_threshold),
                f"session_click_threshold: expected a finite number, got {cfg.session_click_threshold}",
            ),
        ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"data.generator.{message}")


def build_world(cfg: GeneratorConfig) -> World:
    """Items, categories, latent vectors and the user population for ``cfg`` (deterministic from its seed).

    Memory is O(num_items * latent_dim + num_users * interests_per_user).
    """
    validate_generator_config(cfg)
    rng = _rng(cfg, _WORLD_STREAM)
    n_items, n_cats, dim = cfg.num_items, cfg.num_categories, cfg.latent_dim

    # Uneven category sizes: every category gets one item, the rest is split by log-normal weights
    # (a few big categories, a long tail of small ones, like a real catalogue).
    weights = rng.lognormal(mean=0.0, sigma=1.0, size=n_cats)
    sizes = 1 + rng.multinomial(n_items - n_cats, weights / weights.sum())
    item_category = np.zeros(n_items + 1, dtype=np.int64)
    # Categories are assigned to item ids in a random order so ids carry no category information.
    item_category[1:] = rng.permutation(np.repeat(np.arange(1, n_cats + 1, dtype=np.int64), sizes))

    # Zipf popularity over a random ranking of items (independent of category).
    ranks = rng.permutation(n_items) + 1
    item_popularity = np.zeros(n_items + 1, dtype=np.float64)
    item_popularity[1:] = ranks.astype(np.float64) ** (-cfg.zipf_exponent)

    # Latent vectors: category centroid + noise of expected norm item_noise, then unit-normalised.
    centroids = rng.standard_normal((n_cats + 1, dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    noise = rng.standard_normal((n_items + 1, dim)) / math.sqrt(dim)
    vectors = centroids[item_category] + cfg.item_noise * noise
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[0] = 0.0
    item_vectors = vectors.astype(np.float32)

    # Category blocks for inverse-CDF sampling inside a category.
    items_by_category = np.argsort(item_category[1:], kind="stable").astype(np.int64) + 1
    popularity_cumsum = np.cumsum(item_popularity[items_by_category])
    block_end = np.cumsum(sizes)  # exclusive end position of each category's block
    block_begin = block_end - sizes
    category_first = np.zeros(n_cats + 1, dtype=np.int64)
    category_last = np.zeros(n_cats + 1, dtype=np.int64)
    category_first[1:] = block_begin
    category_last[1:] = block_end - 1
    category_mass = np.zeros(n_cats + 1, dtype=np.float64)
    np.add.at(category_mass, item_category[1:], item_popularity[1:])
    category_start = np.zeros(n_cats + 1, dtype=np.float64)
    category_start[1:] = popularity_cumsum[block_end - 1] - category_mass[1:]

    # Users: interests drawn by category popularity without replacement (Gumbel top-k), in blocks.
    n_users, k = cfg.num_users, cfg.interests_per_user
    log_p = np.log(category_mass[1:] / category_mass[1:].sum())
    user_interests = np.zeros((n_users + 1, k), dtype=np.int64)
    for lo in range(0, n_users, _USER_BLOCK):
        hi = min(n_users, lo + _USER_BLOCK)
        keys = log_p[None, :] + rng.gumbel(size=(hi - lo, n_cats))
        top = np.argpartition(-keys, k - 1, axis=1)[:, :k]
        user_interests[lo + 1 : hi + 1] = np.sort(top, axis=1) + 1
    age_p = rng.dirichlet(np.full(cfg.num_age_buckets, 4.0))
    user_age = np.zeros(n_users + 1, dtype=np.int64)
    user_age[1:] = rng.choice(cfg.num_age_buckets, size=n_users, p=age_p)
    user_gender = np.zeros(n_users + 1, dtype=np.int64)
    user_gender[1:] = (rng.random(n_users) < 0.5).astype(np.int64)
    # Small profile effects: the profile tables have something to learn, but the history dominates.
    s = cfg.profile_strength
    user_bias = np.zeros(n_users + 1, dtype=np.float32)
    user_bias[1:] = s * rng.standard_normal(n_users)
    age_effect = (s * rng.standard_normal(cfg.num_age_buckets)).astype(np.float32)
    gender_effect = np.array([-0.5 * s, 0.5 * s], dtype=np.float32)

    # Drifting interests come from their own stream, so the rest of the world is the same with drift on/off.
    user_interest_phases = None
    if cfg.drift:
        n_phases = cfg.drift_phases
        drift_rng = _rng(cfg, _DRIFT_WORLD_STREAM)
        user_interest_phases = np.zeros((n_users + 1, n_phases, k), dtype=np.int64)
        for lo in range(0, n_users, _USER_BLOCK):
            hi = min(n_users, lo + _USER_BLOCK)
            keys = log_p[None, :] + drift_rng.gumbel(size=(hi - lo, n_cats))
            # Gumbel top-(phases x k) in key order, cut into phase sets: distinct categories throughout.
            top = np.argsort(-keys, axis=1, kind="stable")[:, : n_phases * k]
            user_interest_phases[lo + 1 : hi + 1] = top.reshape(hi - lo, n_phases, k) + 1

    return World(
        item_category=item_category,
        item_popularity=item_popularity,
        item_vectors=item_vectors,
        items_by_category=items_by_category,
        popularity_cumsum=popularity_cumsum,
        category_start=category_start,
        category_mass=category_mass,
        category_first=category_first,
        category_last=category_last,
        user_interests=user_interests,
        user_age=user_age,
        user_gender=user_gender,
        user_bias=user_bias,
        age_effect=age_effect,
        gender_effect=gender_effect,
        user_interest_phases=user_interest_phases,
    )


def item_latent_vectors(cfg: GeneratorConfig) -> np.ndarray:
    """``[num_items + 1, latent_dim]`` float32 unit latent vectors the clicks were drawn from (row 0 zeros)."""
    return build_world(cfg).item_vectors


def item_categories(cfg: GeneratorConfig) -> np.ndarray:
    """``[num_items + 1]`` int64 category id of every item (index 0 is the reserved id, category 0)."""
    return build_world(cfg).item_category


def item_feature_tables(world: World) -> dict[str, np.ndarray]:
    """What ``item_features.npz`` holds: for every non-item sequence table, the id of each item in that table
    (``category``: ``[num_items + 1]`` int64, index 0 the reserved id with category 0)."""
    return {"category": world.item_category}


# --------------------------------------------------------------------------------------------------------
# Sample chunks
# --------------------------------------------------------------------------------------------------------


def _groups_per_chunk(cfg: GeneratorConfig) -> int:
    """Sample groups per chunk so a chunk holds about ``_CHUNK_CELLS`` history cells."""
    return max(1, _CHUNK_CELLS // (cfg.samples_per_user * max(1, cfg.max_history)))


def _list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """``list<int64>`` from ``[n + 1]`` int32 offsets and flat int64 values."""
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(values, type=pa.int64()))


@dataclass
class _Structure:
    """The drift and session layout of a chunk's base sequences (see :func:`_structured_groups`).

    Attributes:
        phase: ``[G, H]`` int64, drift phase (0 oldest) of the unit (behaviour, or session) each position
            belongs to; all zeros without drift.
        rotation: ``[G]`` int64, which of the user's interest sets is the group's phase 0.
        session_start: ``[G, H]`` bool, position opens a session (None without sessions).
        session_index: ``[G, H]`` int64, session of each position, 0 first (None without sessions).
        theme: ``[G, H]`` int64, the category of each position's session (None without sessions).
        session_theme: ``[G, H]`` int64, the category of each session by session index (None without
            sessions; entries past the group's last session are unused).
    """

    phase: np.ndarray
    rotation: np.ndarray
    session_start: np.ndarray | None = None
    session_index: np.ndarray | None = None
    theme: np.ndarray | None = None
    session_theme: np.ndarray | None = None


def _interest_categories(
    cfg: GeneratorConfig,
    world: World,
    users: np.ndarray,
    phase: np.ndarray,
    rotation: np.ndarray,
    which: np.ndarray,
) -> np.ndarray:
    """The ``which``-th interest of each user in drift phase ``phase`` (the user's fixed interests without
    drift). ``users``, ``rotation``: per row of ``phase``; ``phase`` and ``which`` have one shape."""
    if not cfg.drift:
        return world.user_interests[users.reshape(-1, *([1] * (phase.ndim - 1))), which]
    assert world.user_interest_phases is not None
    sets = (rotation.reshape(-1, *([1] * (phase.ndim - 1))) + phase) % cfg.drift_phases
    return world.user_interest_phases[users.reshape(-1, *([1] * (phase.ndim - 1))), sets, which]


def _structured_groups(
    cfg: GeneratorConfig, world: World, rng: np.random.Generator, users: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, _Structure]:
    """Base sequences with drift and/or sessions: ``(items [G, H], timestamps [G, H], start [G], structure)``.

    * Drift: the ``H`` positions fall into ``drift_phases`` equal phases by position; phase ``p`` draws its
      interest behaviours from the user's interest set ``(rotation + p) mod drift_phases``.
    * Sessions: the sequence is cut into sessions of ``session_min_behaviors..session_max_behaviors``
      behaviours; each session has one theme category (an interest of the session's phase with probability
      ``interest_focus``, else the category of a globally popular item) and all its items come from it (by
      popularity). Gaps inside a session are ``min(floor(Exp(session_inner_gap_seconds)), session_gap)``,
      between sessions ``session_gap + 1 + floor(Exp(session_break_seconds))``.
    * Without sessions the units are single behaviours, drawn as in the plain generator (interest item with
      probability ``interest_focus``, else a globally popular item) with exponential gaps.
    """
    n_groups, hmax, k = len(users), cfg.max_history, cfg.interests_per_user
    pos = np.arange(hmax)
    if cfg.drift:
        rotation = rng.integers(0, cfg.drift_phases, size=n_groups)  # [G]
        pos_phase = np.broadcast_to((pos * cfg.drift_phases) // max(1, hmax), (n_groups, hmax))  # [G, H]
    else:
        rotation = np.zeros(n_groups, dtype=np.int64)
        pos_phase = np.zeros((n_groups, hmax), dtype=np.int64)

    if not cfg.sessions:
        from_interest = rng.random((n_groups, hmax)) < cfg.interest_focus
        which = rng.integers(0, k, size=(n_groups, hmax))
        wanted = _interest_categories(cfg, world, users, pos_phase, rotation, which)
        u = rng.random((n_groups, hmax))
        items = np.where(from_interest, world.sample_items(wanted, u), world.sample_items(None, u))
        gaps = np.floor(rng.exponential(cfg.mean_gap_seconds, size=(n_groups, hmax))).astype(np.int64)
        start = cfg.start_timestamp + rng.integers(0, _TIME_SPAN_SECONDS, size=n_groups)
        structure = _Structure(phase=np.ascontiguousarray(pos_phase), rotation=rotation)
        return items, start[:, None] + np.cumsum(gaps, axis=1), start, structure

    # Sessions: at most H of them per group; session s covers positions [first[s], first[s] + size[s]).
    sizes = rng.integers(cfg.session_min_behaviors, cfg.session_max_behaviors + 1, size=(n_groups, hmax))
    first = np.cumsum(sizes, axis=1) - sizes  # [G, S]
    opened = first < hmax
    session_start = np.zeros((n_groups, hmax), dtype=bool)
    session_start[np.nonzero(opened)[0], first[opened]] = True
    session_index = np.cumsum(session_start, axis=1) - 1  # [G, H]
    first = np.minimum(first, hmax - 1)  # sessions past the end are never used; keep indices valid
    session_phase = np.take_along_axis(pos_phase, first, axis=1)  # [G, S]
    # One theme per session: an interest of its phase, or (noise) the category of a globally popular item.
    from_interest = rng.random((n_groups, hmax)) < cfg.interest_focus
    which = rng.integers(0, k, size=(n_groups, hmax))
    wanted = _interest_categories(cfg, world, users, session_phase, rotation, which)
    noise = world.item_category[world.sample_items(None, rng.random((n_groups, hmax)))]
    session_theme = np.where(from_interest, wanted, noise)  # [G, S]
    theme = np.take_along_axis(session_theme, session_index, axis=1)  # [G, H]
    items = world.sample_items(theme, rng.random((n_groups, hmax)))
    inner = np.minimum(
        np.floor(rng.exponential(cfg.session_inner_gap_seconds, size=(n_groups, hmax))),
        cfg.session_gap_seconds,
    ).astype(np.int64)
    brk = (
        cfg.session_gap_seconds
        + 1
        + np.floor(rng.exponential(cfg.session_break_seconds, size=(n_groups, hmax)))
    )
    gaps = np.where(session_start, brk.astype(np.int64), inner)
    gaps[:, 0] = 0
    start = cfg.start_timestamp + rng.integers(0, _TIME_SPAN_SECONDS, size=n_groups)
    structure = _Structure(
        phase=np.take_along_axis(session_phase, session_index, axis=1),
        rotation=rotation,
        session_start=session_start,
        session_index=session_index,
        theme=theme,
        session_theme=session_theme,
    )
    return items, start[:, None] + np.cumsum(gaps, axis=1), start, structure


def _session_candidates(
    cfg: GeneratorConfig,
    structure: _Structure,
    rng: np.random.Generator,
    group_of_row: np.ndarray,
    lengths: np.ndarray,
) -> np.ndarray:
    """Interest-candidate categories with sessions on: the theme of a uniformly chosen session of the row's
    prefix (retargeting), so a candidate matches one, several or none of the recent sessions. With drift, a
    share ``drift_old_share`` is chosen among the sessions of older phases (when there are any), the rest
    among the sessions of the current phase (that of the prefix's last session). ``[N]`` int64."""
    assert structure.session_index is not None and structure.session_theme is not None
    n_rows, hmax = len(lengths), cfg.max_history
    last = np.maximum(lengths - 1, 0)
    n_sessions = structure.session_index[group_of_row, last] + 1  # sessions in the prefix
    lo = np.zeros(n_rows, dtype=np.int64)
    hi = n_sessions
    if cfg.drift:
        phases = cfg.drift_phases
        current = structure.phase[group_of_row, last]
        begin = (current * hmax + phases - 1) // phases  # first position of the current phase
        # Sessions that started before the current phase (so belong to older phases); 0 in phase 0.
        n_old = np.where(current > 0, structure.session_index[group_of_row, np.maximum(begin - 1, 0)] + 1, 0)
        old = (rng.random(n_rows) < cfg.drift_old_share) & (n_old > 0)
        lo = np.where(old, 0, n_old)
        hi = np.where(old, n_old, n_sessions)
    pick = lo + np.floor(rng.random(n_rows) * (hi - lo)).astype(np.int64)
    return structure.session_theme[group_of_row, np.minimum(pick, hi - 1)]


def _session_score(
    cfg: GeneratorConfig,
    structure: _Structure,
    group_of_row: np.ndarray,
    lengths: np.ndarray,
    cand_cats: np.ndarray,
) -> np.ndarray:
    """Per row, ``min(n, session_click_cap) / session_click_cap`` with ``n`` the number of sessions about the
    candidate's category among the last ``session_window`` sessions of the row's prefix (0 = all of them).
    The prefix's last session counts even if the prefix cuts it short."""
    assert structure.session_start is not None and structure.session_index is not None
    assert structure.theme is not None
    hmax = cfg.max_history
    window = cfg.session_window
    last = np.maximum(lengths - 1, 0)
    sidx = structure.session_index[group_of_row]  # [N, H]
    last_session = sidx[np.arange(len(lengths)), last]  # [N]
    counted = structure.session_start[group_of_row] & (np.arange(hmax)[None, :] < lengths[:, None])
    if window > 0:
        counted &= sidx > (last_session - window)[:, None]
    counted &= structure.theme[group_of_row] == cand_cats[:, None]
    n = counted.sum(axis=1)
    cap = cfg.session_click_cap
    return np.minimum(n, cap).astype(np.float64) / cap


def _generate_chunk(
    cfg: GeneratorConfig, world: World, rng: np.random.Generator, n_groups: int, n_rows: int
) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """One chunk: ``n_groups`` sample groups, ``n_rows <= n_groups * samples_per_user`` rows.

    With ``drift`` and ``sessions`` off this is the plain process of the module docstring (and its random
    draws must stay exactly as they are: the default dataset is byte-identical across versions).

    Returns:
        The chunk as a table with :data:`SCHEMA`, and per-table id arrays to count for ``frequencies.npz``
        (``item`` and ``category`` hold history and target ids, ``user``/``age``/``gender`` one per row).
    """
    spu, hmax, k = cfg.samples_per_user, cfg.max_history, cfg.interests_per_user
    structured = cfg.drift or cfg.sessions

    # --- groups: a user and a base behaviour sequence of max_history behaviours ----------------------------
    users = rng.integers(1, cfg.num_users + 1, size=n_groups)  # [G]
    interests = world.user_interests[users]  # [G, k]
    structure: _Structure | None = None
    if structured:
        base_items, base_ts, start, structure = _structured_groups(cfg, world, rng, users)
    else:
        from_interest = rng.random((n_groups, hmax)) < cfg.interest_focus  # [G, H]
        which = rng.integers(0, k, size=(n_groups, hmax))  # [G, H]
        hist_cats_wanted = np.take_along_axis(interests, which, axis=1)  # [G, H]
        u = rng.random((n_groups, hmax))
        base_items = np.where(
            from_interest, world.sample_items(hist_cats_wanted, u), world.sample_items(None, u)
        )  # [G, H]
        # Integer gaps so timestamps are exactly non-decreasing after the cumulative sum.
        gaps = np.floor(rng.exponential(cfg.mean_gap_seconds, size=(n_groups, hmax))).astype(np.int64)
        start = cfg.start_timestamp + rng.integers(0, _TIME_SPAN_SECONDS, size=n_groups)  # [G]
        base_ts = start[:, None] + np.cumsum(gaps, axis=1)  # [G, H]

    # --- rows: a prefix of the group's sequence and a candidate ------------------------------------------
    group_of_row = np.arange(n_rows) // spu  # [N]
    lengths = rng.integers(cfg.min_history, hmax + 1, size=n_rows)  # [N]
    cand_from_interest = rng.random(n_rows) < 0.5
    if structure is None:
        cand_cats_wanted = interests[group_of_row, rng.integers(0, k, size=n_rows)]
    elif cfg.sessions:
        cand_cats_wanted = _session_candidates(cfg, structure, rng, group_of_row, lengths)
        # An empty prefix has no session to retarget: fall back to the user's interests.
        cand_cats_wanted = np.where(
            lengths > 0, cand_cats_wanted, interests[group_of_row, rng.integers(0, k, size=n_rows)]
        )
    else:
        # Drift: the row's current phase is that of its last behaviour; a share drift_old_share of the
        # interest candidates comes from an older phase (uniformly), so "matches an old interest" and
        # "matches a current one" both occur and only the order of the history tells them apart.
        which = rng.integers(0, k, size=n_rows)
        phase = structure.phase[group_of_row, np.maximum(lengths - 1, 0)]
        old = (rng.random(n_rows) < cfg.drift_old_share) & (phase > 0)
        older = np.floor(rng.random(n_rows) * phase).astype(np.int64)
        phase = np.where(old, older, phase)
        cand_cats_wanted = _interest_categories(
            cfg, world, users[group_of_row], phase, structure.rotation[group_of_row], which
        )
    u = rng.random(n_rows)
    cand_items = np.where(
        cand_from_interest, world.sample_items(cand_cats_wanted, u), world.sample_items(None, u)
    )  # [N]
    # Target time follows the row's last behaviour (or the group start for an empty history).
    last_ts = start[group_of_row]  # [N]
    nonempty = lengths > 0
    last_ts[nonempty] = base_ts[group_of_row[nonempty], lengths[nonempty] - 1]
    if cfg.sessions:  # the impression belongs to the ongoing session
        step = np.minimum(
            np.floor(rng.exponential(cfg.session_inner_gap_seconds, size=n_rows)), cfg.session_gap_seconds
        )
    else:
        step = np.floor(rng.exponential(cfg.mean_gap_seconds, size=n_rows))
    target_ts = last_ts + step.astype(np.int64)
    cand_cats = world.item_category[cand_items]

    # --- click score: the most similar behaviour in the prefix (or its recent part), or session matches -----
    if cfg.sessions:
        assert structure is not None
        score = _session_score(cfg, structure, group_of_row, lengths, cand_cats)
    else:
        # Batched matmul per group avoids materialising [N, H, D]: cand [G, spu, D] @ base^T [G, D, H].
        cand_vec = np.zeros((n_groups * spu, cfg.latent_dim), dtype=np.float32)
        cand_vec[:n_rows] = world.item_vectors[cand_items]
        base_vec = world.item_vectors[base_items]  # [G, H, D]
        sims = np.matmul(cand_vec.reshape(n_groups, spu, -1), base_vec.transpose(0, 2, 1))  # [G, spu, H]
        sims = sims.reshape(n_groups * spu, hmax)[:n_rows]  # [N, H]
        in_prefix = np.arange(hmax)[None, :] < lengths[:, None]  # [N, H]
        if cfg.drift:  # only the most recent drift_recent behaviours count
            in_prefix &= np.arange(hmax)[None, :] >= (lengths - cfg.drift_recent)[:, None]
        s_max = np.where(in_prefix, sims, -np.inf).max(axis=1, initial=-np.inf)  # [N]
        # An empty history is "no evidence": similarity 0, as for an unrelated item.
        score = np.where(lengths > 0, s_max, 0.0).astype(np.float64)
    row_users = users[group_of_row]
    age = world.user_age[row_users]
    gender = world.user_gender[row_users]
    threshold = cfg.session_click_threshold if cfg.sessions else cfg.click_threshold
    logit = (
        cfg.click_sharpness * (score - threshold)
        + cfg.click_bias
        + world.user_bias[row_users]
        + world.age_effect[age]
        + world.gender_effect[gender]
    )
    click_prob = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n_rows) < click_prob).astype(np.float32)

    # --- jagged history lists: row r holds base[group_of_row[r], :lengths[r]] -----------------------------
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    if total > np.iinfo(np.int32).max:  # pragma: no cover - _CHUNK_CELLS keeps chunks far below this
        raise OverflowError("chunk too large for int32 list offsets")
    row_of_value = np.repeat(np.arange(n_rows), lengths)  # [T]
    pos = np.arange(total) - offsets[row_of_value]  # position inside the row's prefix
    flat = group_of_row[row_of_value] * hmax + pos  # index into base_* flattened
    hist_items = base_items.reshape(-1)[flat]
    hist_cats = world.item_category[hist_items]
    hist_ts = base_ts.reshape(-1)[flat]
    offsets32 = offsets.astype(np.int32)

    table = pa.Table.from_arrays(
        [
            pa.array(row_users, type=pa.int64()),
            pa.array(age, type=pa.int64()),
            pa.array(gender, type=pa.int64()),
            _list_array(offsets32, hist_items),
            _list_array(offsets32, hist_cats),
            _list_array(offsets32, hist_ts),
            pa.array(cand_items, type=pa.int64()),
            pa.array(cand_cats, type=pa.int64()),
            pa.array(target_ts, type=pa.int64()),
            pa.array(label, type=pa.float32()),
            pa.array(click_prob.astype(np.float32), type=pa.float32()),
        ],
        schema=SCHEMA,
    )
    ids = {
        "item": np.concatenate([hist_items, cand_items]),
        "category": np.concatenate([hist_cats, cand_cats]),
        "user": row_users,
        "age": age,
        "gender": gender,
    }
    return table, ids


def _chunks(
    cfg: GeneratorConfig, world: World, split: str, n_rows: int
) -> Iterator[tuple[pa.Table, dict[str, np.ndarray]]]:
    """The chunks of one split, in order; chunk ``c`` uses the stream ``(seed, split, c)``."""
    spu = cfg.samples_per_user
    n_groups = -(-n_rows // spu)
    per_chunk = _groups_per_chunk(cfg)
    for c, g0 in enumerate(range(0, n_groups, per_chunk)):
        g = min(per_chunk, n_groups - g0)
        rows = min(g * spu, n_rows - g0 * spu)  # the last group may be cut short
        yield _generate_chunk(cfg, world, _rng(cfg, _SPLIT_STREAMS[split], c), g, rows)


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def _table_sizes(cfg: GeneratorConfig) -> dict[str, int]:
    """``table name -> num_embeddings`` of the written ids (0 reserved for item, category and user)."""
    return {
        "item": cfg.num_items + 1,
        "category": cfg.num_categories + 1,
        "user": cfg.num_users + 1,
        "age": cfg.num_age_buckets,
        "gender": 2,
    }


class _RowSource:
    """Hands out exactly ``n`` rows at a time from a stream of chunk tables (carrying leftovers over)."""

    def __init__(self, chunks: Iterator[pa.Table]) -> None:
        self._chunks = chunks
        self._pending: pa.Table | None = None

    def take(self, n: int) -> Iterator[pa.Table]:
        """Yield tables whose row counts sum to ``n`` (fewer only if the stream ends)."""
        while n > 0:
            if self._pending is None or self._pending.num_rows == 0:
                nxt = next(self._chunks, None)
                if nxt is None:
                    return
                self._pending = nxt
            part = self._pending.slice(0, n)
            self._pending = self._pending.slice(part.num_rows)
            n -= part.num_rows
            yield part


def _write_part(path: Path, pieces: Iterator[pa.Table], row_group_size: int) -> int:
    """Write ``pieces`` to one parquet file atomically, in row groups of exactly ``row_group_size`` rows
    (the last one may be smaller). Returns the number of rows written."""
    written = 0

    def write(tmp: str) -> None:
        nonlocal written
        buffer: list[pa.Table] = []
        buffered = 0
        with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            # Chunks rarely align with row groups, so buffer slices until a full row group is available.
            for piece in pieces:
                buffer.append(piece)
                buffered += piece.num_rows
                if buffered < row_group_size:
                    continue
                # Combine once, then cut as many full row groups as the buffer holds (no re-copying).
                merged = pa.concat_tables(buffer).combine_chunks()
                start = 0
                while buffered - start >= row_group_size:
                    writer.write_table(merged.slice(start, row_group_size), row_group_size=row_group_size)
                    start += row_group_size
                written += start
                rest = merged.slice(start)
                buffer, buffered = [rest], rest.num_rows
            if buffered:
                writer.write_table(pa.concat_tables(buffer).combine_chunks(), row_group_size=row_group_size)
                written += buffered

    atomic_write_with(path, write, suffix=".parquet")
    return written


def _write_split(
    cfg: GeneratorConfig,
    world: World,
    split: str,
    n_rows: int,
    out_dir: Path,
    counts: dict[str, np.ndarray] | None,
    bar: tqdm,
) -> float:
    """Write one split as ``out_dir/split/part-*.parquet`` and return its click rate.

    Parts go to a temporary sibling folder (each part atomically renamed inside it), which then replaces
    ``out_dir/split`` as a whole, so stale parts of an earlier, larger run never survive. ``counts`` (train
    only) accumulates the id frequencies.
    """
    clicks = 0.0

    def tables() -> Iterator[pa.Table]:
        nonlocal clicks
        for table, ids in _chunks(cfg, world, split, n_rows):
            if counts is not None:
                for name, values in ids.items():
                    counts[name] += np.bincount(values, minlength=len(counts[name]))
            clicks += float(np.sum(table.column("label").to_numpy()))
            bar.update(table.num_rows)
            yield table

    tmp_dir = out_dir / f".{split}.tmp"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    source = _RowSource(tables())
    n_files = max(1, -(-n_rows // cfg.rows_per_file))  # an empty split still gets one (empty) part
    for i in range(n_files):
        rows = min(cfg.rows_per_file, n_rows - i * cfg.rows_per_file)
        written = _write_part(tmp_dir / f"part-{i:05d}.parquet", source.take(rows), cfg.row_group_size)
        if written != rows:  # pragma: no cover - a bookkeeping bug, never a user error
            raise RuntimeError(f"{split} part {i}: wrote {written} rows, expected {rows}")
    atomic_replace_dir(tmp_dir, out_dir / split)
    return clicks / n_rows if n_rows else 0.0


def generate_dataset(cfg: GeneratorConfig, out_dir: str | Path, progress: bool = True) -> dict[str, Any]:
    """Generate the train and test splits, ``frequencies.npz``, ``item_features.npz`` and ``meta.json``.

    Layout: ``train/part-NNNNN.parquet`` (``cfg.train_samples`` rows, ``cfg.rows_per_file`` per file, row
    groups of ``cfg.row_group_size``), ``test/part-NNNNN.parquet`` (``cfg.test_samples`` rows),
    ``frequencies.npz`` (int64 id counts over the train split, keyed by table name), ``item_features.npz``
    (:func:`item_feature_tables`: each item's id in every non-item sequence table) and ``meta.json``
    (written last; its presence marks a complete dataset). See ``docs/data_format.md``.

    Returns:
        The meta dict written to ``meta.json``.
    """
    validate_generator_config(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(cfg)
    sizes = _table_sizes(cfg)
    counts = {name: np.zeros(n, dtype=np.int64) for name, n in sizes.items()}

    with tqdm(
        total=cfg.train_samples + cfg.test_samples, unit="rows", desc="generate", disable=not progress
    ) as bar:
        train_rate = _write_split(cfg, world, "train", cfg.train_samples, out, counts, bar)
        test_rate = _write_split(cfg, world, "test", cfg.test_samples, out, None, bar)

    atomic_write_with(out / "frequencies.npz", lambda tmp: np.savez(tmp, **counts), suffix=".npz")
    features = item_feature_tables(world)
    atomic_write_with(out / "item_features.npz", lambda tmp: np.savez(tmp, **features), suffix=".npz")
    meta: dict[str, Any] = {
        "tables": sizes,
        "rows": {"train": cfg.train_samples, "test": cfg.test_samples},
        "click_rate": {"train": train_rate, "test": test_rate},
        "generator": dataclasses.asdict(cfg),
        "schema_version": SCHEMA_VERSION,
    }
    atomic_write_json(out / "meta.json", meta)
    return meta
