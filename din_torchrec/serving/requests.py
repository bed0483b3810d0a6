"""Ranking requests: their shape, strict validation, and the serving policy.

A request names one user, their behaviour history and the candidates to score::

    {
      "user_id": 17,
      "profile": {"user_age": 3, "user_gender": 1},          # profile columns (or table names)
      "history": {"item": [5, 9, 12], "category": [2, 2, 7],  # one list per sequence table, oldest first
                  "timestamps": [1700000000, 1700000300, 1700000900]},
      "candidates": {"item": [44, 45], "category": [7, 3]},   # one list per sequence table
      "history_version": 12                                   # optional, see the Predictor's cache
    }

Sequence tables may be named by table name (``item``) or by column (``hist_item_ids`` in ``history``,
``target_item_id`` in ``candidates``); profile entries by column (``user_age``) or table name (``age``).
The user id fills the profile column ``features.user_column`` unless the profile gives it.

Every problem raises :class:`RequestError` naming the field and carrying the HTTP status the server
answers with: 400 (malformed: wrong type, missing or unknown field, lists of different lengths), 413 (too
large: too many candidates, a history over ``max_history`` under the ``reject`` policy), 422 (an id outside
its table under the ``reject`` policy).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from din_torchrec.config import ExperimentConfig, FeaturesConfig

TIMESTAMPS_KEY = "timestamps"


class RequestError(ValueError):
    """A request that cannot be served.

    Attributes:
        status: the HTTP status for it (400, 413 or 422).
        field: the offending field (``candidates.item[3]``), or None.
    """

    def __init__(self, message: str, status: int = 400, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.field = field

    def to_json(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "field": self.field, "message": self.message}}


@dataclass
class ServingPolicy:
    """How requests are checked.

    Attributes:
        max_history: behaviours kept (the most recent); default the training config's ``data.max_history``.
        long_history: ``truncate`` keeps the most recent ``max_history`` behaviours (as the training reader
            does); ``reject`` refuses a longer history (413).
        unknown_ids: ``reject`` refuses an id outside its table (422); ``zero`` maps it to the reserved id 0.
        max_candidates: candidates per request (more: 413).
        missing_profile: ``reject`` (400) or ``zero`` (the reserved id 0) for an absent profile column.
        require_timestamps: None requires timestamps only for models that read them (DSIN).
    """

    max_history: int = 50
    long_history: Literal["truncate", "reject"] = "truncate"
    unknown_ids: Literal["reject", "zero"] = "reject"
    max_candidates: int = 10_000
    missing_profile: Literal["reject", "zero"] = "reject"
    require_timestamps: bool | None = None

    @classmethod
    def for_config(cls, cfg: ExperimentConfig, **overrides: Any) -> ServingPolicy:
        policy = cls(max_history=cfg.data.max_history, **overrides)
        policy.check()
        return policy

    def check(self) -> None:
        if self.max_history <= 0:
            raise ValueError(f"max_history: expected a positive integer, got {self.max_history}")
        if self.max_candidates <= 0:
            raise ValueError(f"max_candidates: expected a positive integer, got {self.max_candidates}")
        for name, value, allowed in (
            ("long_history", self.long_history, ("truncate", "reject")),
            ("unknown_ids", self.unknown_ids, ("reject", "zero")),
            ("missing_profile", self.missing_profile, ("reject", "zero")),
        ):
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")


@dataclass
class RankRequest:
    """One user and the candidates to rank for them (see the module docstring for the field meanings).

    ``history`` / ``candidates`` map a sequence table (name or column) to a list of ids (or a 1-d integer
    array / tensor); ``history`` may also hold ``timestamps``.
    """

    user_id: int
    history: Mapping[str, Any]
    candidates: Mapping[str, Any]
    profile: Mapping[str, Any] = field(default_factory=dict)
    timestamps: Any = None
    history_version: str | int | None = None

    @classmethod
    def from_json(cls, obj: Any) -> RankRequest:
        """Strictly typed construction from parsed JSON (400 on any structural problem)."""
        if not isinstance(obj, dict):
            raise RequestError(f"request: expected a JSON object, got {_json_type(obj)}", 400, "request")
        known = {"user_id", "profile", "history", "candidates", "history_version", "timestamps"}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise RequestError(
                f"request: unknown field {unknown[0]!r}; expected {sorted(known)}", 400, unknown[0]
            )
        for required in ("user_id", "history", "candidates"):
            if required not in obj:
                raise RequestError(f"{required}: required field missing", 400, required)
        for name in ("history", "candidates", "profile"):
            if name in obj and not isinstance(obj[name], dict):
                raise RequestError(f"{name}: expected a JSON object, got {_json_type(obj[name])}", 400, name)
        version = obj.get("history_version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int))):
            raise RequestError(
                f"history_version: expected a string or an integer, got {_json_type(version)}",
                400,
                "history_version",
            )
        return cls(
            user_id=obj["user_id"],
            history=obj["history"],
            candidates=obj["candidates"],
            profile=obj.get("profile", {}),
            timestamps=obj.get("timestamps"),
            history_version=version,
        )


def make_request(
    user: Any,
    history: Mapping[str, Any],
    candidates: Mapping[str, Any],
    *,
    profile: Mapping[str, Any] | None = None,
    timestamps: Any = None,
    history_version: str | int | None = None,
) -> RankRequest:
    """A :class:`RankRequest` from the Python API's arguments: ``user`` is a user id or a mapping with
    ``user_id`` and profile columns; ``profile`` is merged over it."""
    if isinstance(user, Mapping):
        if "user_id" not in user:
            raise RequestError("user: expected a user id or a mapping with 'user_id'", 400, "user_id")
        prof = {k: v for k, v in user.items() if k != "user_id"}
        user_id = user["user_id"]
    else:
        prof, user_id = {}, user
    prof.update(profile or {})
    return RankRequest(user_id, history, candidates, prof, timestamps, history_version)


@dataclass
class PreparedRequest:
    """A validated request as arrays.

    Attributes:
        user_id: the user.
        profile: ``[P]`` int64 ids, one per profile table in config order.
        history: ``[Q, T]`` int64 ids, one row per sequence table in config order, oldest first.
        timestamps: ``[T]`` int64.
        candidates: ``[Q, N]`` int64.
        truncated: behaviours dropped by the ``truncate`` policy.
        digest: hash of (profile, history, timestamps): what the user-side state depends on.
        cache_key: ``(user_id, history_version or digest)``.
    """

    user_id: int
    profile: np.ndarray
    history: np.ndarray
    timestamps: np.ndarray
    candidates: np.ndarray
    truncated: int
    digest: str
    cache_key: tuple[int, str | int]

    @property
    def num_candidates(self) -> int:
        return int(self.candidates.shape[1])

    @property
    def history_length(self) -> int:
        return int(self.history.shape[1])


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, np.integer)):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(x: Any) -> bool:
    return (isinstance(x, int) and not isinstance(x, bool)) or isinstance(x, np.integer)


def int_scalar(value: Any, name: str) -> int:
    """A Python/numpy integer (not a bool), or 400."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if not _is_int(value):
        raise RequestError(f"{name}: expected an integer, got {_json_type(value)}", 400, name)
    return int(value)


def int_array(value: Any, name: str) -> np.ndarray:
    """A list of integers (or a 1-d integer array / tensor) as int64, or 400 naming the bad element."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise RequestError(
                f"{name}: expected a 1-d integer tensor, got {value.dtype} {tuple(value.shape)}"
            )
        return value.detach().cpu().numpy().astype(np.int64, copy=False)
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.dtype.kind not in "iu":
            raise RequestError(
                f"{name}: expected a 1-d integer array, got {value.dtype} {value.shape}", 400, name
            )
        return value.astype(np.int64, copy=False)
    if not isinstance(value, (list, tuple)):
        raise RequestError(f"{name}: expected an array of integers, got {_json_type(value)}", 400, name)
    for i, x in enumerate(value):
        if not _is_int(x):
            raise RequestError(f"{name}[{i}]: expected an integer, got {_json_type(x)}", 400, f"{name}[{i}]")
    try:
        return np.asarray(value, dtype=np.int64).reshape(-1)
    except OverflowError as e:
        raise RequestError(f"{name}: an integer does not fit in 64 bits", 400, name) from e


class RequestValidator:
    """Turns :class:`RankRequest` objects into :class:`PreparedRequest` arrays under a :class:`ServingPolicy`."""

    def __init__(self, features: FeaturesConfig, policy: ServingPolicy, needs_timestamps: bool) -> None:
        policy.check()
        self.features = features
        self.policy = policy
        self.needs_timestamps = (
            needs_timestamps if policy.require_timestamps is None else policy.require_timestamps
        )
        seq = features.sequence
        self.seq_names = [t.name for t in seq]
        self.history_keys = {t.name: i for i, t in enumerate(seq)} | {
            t.history_column: i for i, t in enumerate(seq)
        }
        self.candidate_keys = {t.name: i for i, t in enumerate(seq)} | {
            t.target_column: i for i, t in enumerate(seq)
        }
        self.seq_sizes = [t.num_embeddings for t in seq]
        prof = features.profile
        self.profile_keys = {p.column: i for i, p in enumerate(prof)} | {
            p.name: i for i, p in enumerate(prof)
        }
        self.profile_columns = [p.column for p in prof]
        self.profile_sizes = [p.num_embeddings for p in prof]
        self.profile_names = [p.name for p in prof]
        self.user_profile_index = next(
            (i for i, p in enumerate(prof) if p.column == features.user_column), None
        )
        if TIMESTAMPS_KEY in self.history_keys:
            raise ValueError(
                f"a sequence table or column is named {TIMESTAMPS_KEY!r}, which requests reserve"
            )

    # ---------------------------------------------------------------------------------------------------

    def _check_ids(self, ids: np.ndarray, size: int, table: str, name: str) -> np.ndarray:
        bad = (ids < 0) | (ids >= size)
        if not bad.any():
            return ids
        if self.policy.unknown_ids == "zero":
            return np.where(bad, 0, ids)
        i = int(np.flatnonzero(bad)[0])
        raise RequestError(
            f"{name}[{i}]: id {int(ids[i])} is not in table {table!r} (ids 0..{size - 1})",
            422,
            f"{name}[{i}]",
        )

    def _columns(
        self, block: Mapping[str, Any], keys: dict[str, int], name: str, allow_ts: bool
    ) -> list[Any]:
        out: list[Any] = [None] * len(self.seq_names)
        for key, value in block.items():
            if allow_ts and key == TIMESTAMPS_KEY:
                continue
            if key not in keys:
                raise RequestError(
                    f"{name}: unknown key {key!r}; expected the sequence tables {self.seq_names}"
                    + (f" and {TIMESTAMPS_KEY!r}" if allow_ts else ""),
                    400,
                    f"{name}.{key}",
                )
            j = keys[key]
            if out[j] is not None:
                raise RequestError(f"{name}: table {self.seq_names[j]!r} given twice", 400, f"{name}.{key}")
            out[j] = value
        for j, value in enumerate(out):
            if value is None:
                raise RequestError(
                    f"{name}.{self.seq_names[j]}: required list missing", 400, f"{name}.{self.seq_names[j]}"
                )
        return out

    def prepare(self, request: RankRequest | Mapping[str, Any]) -> PreparedRequest:
        """Validate one request (see the module docstring for what is checked)."""
        if not isinstance(request, RankRequest):
            request = RankRequest.from_json(dict(request) if isinstance(request, Mapping) else request)
        pol = self.policy
        user_id = int_scalar(request.user_id, "user_id")
        if user_id < 0:
            raise RequestError(f"user_id: expected a non-negative integer, got {user_id}", 422, "user_id")
        if not isinstance(request.history, Mapping):
            raise RequestError(
                f"history: expected an object, got {_json_type(request.history)}", 400, "history"
            )
        if not isinstance(request.candidates, Mapping):
            raise RequestError(
                f"candidates: expected an object, got {_json_type(request.candidates)}", 400, "candidates"
            )
        if not isinstance(request.profile, Mapping):
            raise RequestError(
                f"profile: expected an object, got {_json_type(request.profile)}", 400, "profile"
            )

        # History: equal lengths, timestamps, truncation, id ranges.
        hist_cols = self._columns(request.history, self.history_keys, "history", allow_ts=True)
        hist = [int_array(v, f"history.{self.seq_names[j]}") for j, v in enumerate(hist_cols)]
        lengths = {a.shape[0] for a in hist}
        if len(lengths) > 1:
            got = {n: a.shape[0] for n, a in zip(self.seq_names, hist)}
            raise RequestError(
                f"history: the tables' lists must have equal lengths, got {got}", 400, "history"
            )
        t = hist[0].shape[0]
        ts_value = (
            request.history.get(TIMESTAMPS_KEY, None) if request.timestamps is None else request.timestamps
        )
        if ts_value is None:
            if self.needs_timestamps and t > 0:
                raise RequestError(
                    "history.timestamps: required by this model (sessions are cut by time gaps)",
                    400,
                    "history.timestamps",
                )
            ts = np.zeros(t, dtype=np.int64)
        else:
            ts = int_array(ts_value, "history.timestamps")
            if ts.shape[0] != t:
                raise RequestError(
                    f"history.timestamps: expected {t} timestamps (one per behaviour), got {ts.shape[0]}",
                    400,
                    "history.timestamps",
                )
        truncated = 0
        if t > pol.max_history:
            if pol.long_history == "reject":
                raise RequestError(
                    f"history: {t} behaviours, more than max_history={pol.max_history}", 413, "history"
                )
            truncated = t - pol.max_history
            hist = [a[truncated:] for a in hist]
            ts = ts[truncated:]
        hist = [
            self._check_ids(a, size, name, f"history.{name}")
            for a, size, name in zip(hist, self.seq_sizes, self.seq_names)
        ]

        # Candidates.
        cand_cols = self._columns(request.candidates, self.candidate_keys, "candidates", allow_ts=False)
        cands = [int_array(v, f"candidates.{self.seq_names[j]}") for j, v in enumerate(cand_cols)]
        n = {a.shape[0] for a in cands}
        if len(n) > 1:
            got = {name: a.shape[0] for name, a in zip(self.seq_names, cands)}
            raise RequestError(
                f"candidates: the tables' lists must have equal lengths, got {got}", 400, "candidates"
            )
        num = cands[0].shape[0]
        if num == 0:
            raise RequestError("candidates: expected at least one candidate", 400, "candidates")
        if num > pol.max_candidates:
            raise RequestError(
                f"candidates: {num} candidates, more than max_candidates={pol.max_candidates}",
                413,
                "candidates",
            )
        cands = [
            self._check_ids(a, size, name, f"candidates.{name}")
            for a, size, name in zip(cands, self.seq_sizes, self.seq_names)
        ]

        # Profile.
        profile = np.zeros(len(self.profile_columns), dtype=np.int64)
        given = [False] * len(self.profile_columns)
        for key, value in request.profile.items():
            if key not in self.profile_keys:
                raise RequestError(
                    f"profile: unknown key {key!r}; expected the profile columns {self.profile_columns}",
                    400,
                    f"profile.{key}",
                )
            j = self.profile_keys[key]
            profile[j] = int_scalar(value, f"profile.{key}")
            given[j] = True
        if self.user_profile_index is not None and not given[self.user_profile_index]:
            profile[self.user_profile_index] = user_id
            given[self.user_profile_index] = True
        for j, ok in enumerate(given):
            if not ok and pol.missing_profile == "reject":
                col = self.profile_columns[j]
                raise RequestError(f"profile.{col}: required value missing", 400, f"profile.{col}")
        for j, (size, name) in enumerate(zip(self.profile_sizes, self.profile_names)):
            profile[j : j + 1] = self._check_ids(
                profile[j : j + 1], size, name, f"profile.{self.profile_columns[j]}"
            )

        history = np.stack(hist) if hist else np.zeros((0, t), dtype=np.int64)
        candidates = np.stack(cands)
        h = hashlib.blake2b(digest_size=16)
        for a in (profile, history, ts):
            h.update(np.ascontiguousarray(a).tobytes())
            h.update(b"|")
        digest = h.hexdigest()
        version = request.history_version
        if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int))):
            raise RequestError("history_version: expected a string or an integer", 400, "history_version")
        return PreparedRequest(
            user_id=user_id,
            profile=profile,
            history=history,
            timestamps=ts,
            candidates=candidates,
            truncated=truncated,
            digest=digest,
            cache_key=(user_id, digest if version is None else version),
        )
