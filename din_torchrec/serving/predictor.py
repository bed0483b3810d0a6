"""Online ranking with a trained DIN / DIEN / DSIN / base model.

:class:`Predictor` loads a checkpoint written by the trainer (DCP, any number of ranks) into the plain,
unsharded model and scores candidates for users:

* ``rank(user, history, candidates)`` scores N candidates for one user in one batched pass. The user-side
  work (history and profile embeddings, DIN's behaviour-side attention projection, DIEN's extractor states,
  DSIN's session interests and Bi-LSTM states; see :mod:`din_torchrec.serving.scoring`) runs once per
  request, only the candidate-dependent part runs per candidate.
* ``rank_many(requests)`` serves many requests in one pass: one embedding lookup for all candidates (and for
  the histories not in the cache), the user sides of the cache misses batched, the candidate sides of all
  requests batched.
* User-side state is kept in a thread-safe LRU cache keyed by ``(user, history version)``; the version is
  the caller's ``history_version`` or, when absent, a digest of the (validated, truncated) history, profile
  and timestamps. An entry also records that digest, so a changed history is recomputed even if the caller
  reuses a version; a new version of a user replaces the user's older entry.
* Inputs are validated (:mod:`din_torchrec.serving.requests`): ids outside their tables, over-long
  histories, too many candidates and malformed fields raise :class:`RequestError`.
* ``quantize="int8" | "int4"`` serves from TorchRec's quantized embedding tables
  (:mod:`din_torchrec.serving.quantize`).

Scores equal ``model(batch).logits`` of the training model in eval mode for the same inputs (tests).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from din_torchrec.config import ExperimentConfig, load_config
from din_torchrec.data.batch import Batch
from din_torchrec.embeddings.tables import sequence_table_configs
from din_torchrec.models import build_model
from din_torchrec.models.base import SequenceCTRModel
from din_torchrec.models.dsin import DSIN
from din_torchrec.serving.requests import (
    PreparedRequest,
    RankRequest,
    RequestError,
    RequestValidator,
    ServingPolicy,
    make_request,
)
from din_torchrec.serving.scoring import Scorer, index_gather, make_scorer, split_state, stack_states

__all__ = [
    "CacheInfo",
    "batch_for_candidates",
    "Predictor",
    "Ranking",
    "RankRequest",
    "RequestError",
    "ServingPolicy",
    "load_model",
    "requests_from_batch",
]


# --------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------


def resolve_run(path: str | Path, cfg: ExperimentConfig | None = None) -> tuple[Path, ExperimentConfig]:
    """``(checkpoint folder, config)`` from a run folder (``<output_dir>``, holding ``config.yaml`` and
    ``checkpoint/``) or a checkpoint folder (config from ``../config.yaml`` unless ``cfg`` is given)."""
    path = Path(path)
    ckpt = path / "checkpoint" if (path / "checkpoint").is_dir() else path
    if cfg is None:
        candidates = [ckpt.parent / "config.yaml", path / "config.yaml"]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            raise FileNotFoundError(
                f"{path}: no config.yaml beside the checkpoint; pass the experiment config explicitly"
            )
        cfg = load_config(found)
    return ckpt, cfg


def load_model(checkpoint: str | Path, cfg: ExperimentConfig) -> tuple[SequenceCTRModel, dict[str, Any]]:
    """The plain (unsharded) model of ``cfg`` with the weights of a trainer checkpoint, in eval mode.

    DCP reads the shards of any number of ranks into the full tensors; no process group is needed.
    Returns ``(model, checkpoint metadata)``.
    """
    from din_torchrec.training.checkpoint import META_FILE, CheckpointError, load_checkpoint

    model = build_model(cfg)
    meta_path = Path(checkpoint) / META_FILE
    try:
        legacy = json.loads(meta_path.read_text()).get("format_version", 1) < 2
    except (OSError, json.JSONDecodeError, AttributeError):
        legacy = False  # load_checkpoint reports what is wrong
    if not legacy:
        return model.eval(), load_checkpoint(checkpoint, model)
    # Format 1 (before meta.json recorded file digests): the model entries straight from DCP.
    if not (Path(checkpoint) / ".metadata").exists():
        raise CheckpointError(f"{checkpoint}: incomplete checkpoint (DCP .metadata missing)")
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(checkpoint))
    except Exception as e:  # DCP raises CheckpointException with per-rank details
        raise CheckpointError(
            f"{checkpoint}: could not load into this model ({type(e).__name__}: {e})"
        ) from e
    model.load_state_dict(state["model"])
    return model.eval(), json.loads(meta_path.read_text())


# --------------------------------------------------------------------------------------------------------
# Results and the cache
# --------------------------------------------------------------------------------------------------------


@dataclass
class Ranking:
    """The scores of one request's candidates (in request order).

    Attributes:
        logits: ``[N]`` click logits.
        scores: ``[N]`` click probabilities.
        order: ``[N]`` candidate indices, highest score first.
        cache_hit: whether the user-side state came from the cache.
        truncated: behaviours dropped from the front of an over-long history.
        attention: when asked for, the model's attention maps: DIN ``history [N, T]``, DIEN
            ``evolution [N, T]``, DSIN ``sessions [N, K]`` and ``session_states [N, K]``.
    """

    logits: np.ndarray
    scores: np.ndarray
    order: np.ndarray
    cache_hit: bool = False
    truncated: int = 0
    attention: dict[str, np.ndarray] | None = None

    def top(self, k: int) -> list[tuple[int, float]]:
        """``(candidate index, score)`` of the best ``k``."""
        return [(int(i), float(self.scores[i])) for i in self.order[:k]]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scores": [float(x) for x in self.scores],
            "logits": [float(x) for x in self.logits],
            "order": [int(i) for i in self.order],
            "cache_hit": self.cache_hit,
            "truncated": self.truncated,
        }
        if self.attention is not None:
            out["attention"] = {k: v.tolist() for k, v in self.attention.items()}
        return out


@dataclass
class CacheInfo:
    """Counters of the user-state cache."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    evictions: int = 0
    size: int = 0
    max_size: int = 0


@dataclass
class _Entry:
    digest: str
    state: dict[str, torch.Tensor] = field(default_factory=dict)


class UserStateCache:
    """LRU of user-side states keyed by ``(user, history version)``, bounded to ``max_size`` entries.

    ``get`` returns a state only when the entry's digest matches the request's (a reused version with a
    changed history counts as ``stale`` and is recomputed). ``put`` drops the user's entries for other
    versions: a user's history only moves forward, and old versions would only hold memory.
    """

    def __init__(self, max_size: int) -> None:
        self.max_size = max(0, int(max_size))
        self._data: OrderedDict[tuple[int, Any], _Entry] = OrderedDict()
        self._by_user: dict[int, set[tuple[int, Any]]] = {}
        self._lock = threading.Lock()
        self.info = CacheInfo(max_size=self.max_size)

    def get(self, key: tuple[int, Any], digest: str) -> dict[str, torch.Tensor] | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is None:
                self.info.misses += 1
                return None
            if entry.digest != digest:
                self.info.stale += 1
                self.info.misses += 1
                self._remove(key)
                return None
            self._data.move_to_end(key)
            self.info.hits += 1
            return entry.state

    def put(self, key: tuple[int, Any], digest: str, state: dict[str, torch.Tensor]) -> None:
        if self.max_size == 0:
            return
        with self._lock:
            for old in list(self._by_user.get(key[0], ())):
                if old != key:
                    self._remove(old)
            self._data[key] = _Entry(digest, state)
            self._data.move_to_end(key)
            self._by_user.setdefault(key[0], set()).add(key)
            while len(self._data) > self.max_size:
                oldest = next(iter(self._data))
                self._remove(oldest)
                self.info.evictions += 1
            self.info.size = len(self._data)

    def invalidate_user(self, user_id: int) -> None:
        with self._lock:
            for key in list(self._by_user.get(user_id, ())):
                self._remove(key)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._by_user.clear()
            self.info.size = 0

    def _remove(self, key: tuple[int, Any]) -> None:
        self._data.pop(key, None)
        keys = self._by_user.get(key[0])
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_user[key[0]]
        self.info.size = len(self._data)

    def __len__(self) -> int:
        return len(self._data)


# --------------------------------------------------------------------------------------------------------
# The predictor
# --------------------------------------------------------------------------------------------------------


class Predictor:
    """Scores candidates for users with a trained model (see the module docstring).

    Args:
        model: a model of the family (its weights are used as they are; the predictor switches it to eval).
        cfg: the experiment config the model was built from.
        policy: request checks; default :meth:`ServingPolicy.for_config`.
        cache_size: user states kept (0 disables the cache).
        quantize: None (fp32 tables), ``"int8"``, ``"int4"``, ``"fp16"``, or a table name -> dtype name
            mapping; the model is copied, then its tables are swapped for TorchRec's quantized ones.
    """

    def __init__(
        self,
        model: SequenceCTRModel,
        cfg: ExperimentConfig,
        *,
        policy: ServingPolicy | None = None,
        cache_size: int = 4096,
        quantize: str | Mapping[str, str] | None = None,
    ) -> None:
        if quantize is not None:
            from din_torchrec.serving.quantize import quantize_model

            model = quantize_model(model, quantize)
        self.model = model.eval()
        self.cfg = cfg
        self.features = cfg.features
        self.quantization = quantize
        self.policy = policy or ServingPolicy.for_config(cfg)
        self.validator = RequestValidator(cfg.features, self.policy, needs_timestamps=isinstance(model, DSIN))
        self.scorer: Scorer = make_scorer(model).eval()
        self.cache = UserStateCache(cache_size)
        self._lock = threading.Lock()
        tables = sequence_table_configs(cfg.features, with_negatives=model.uses_negatives)
        # The EC's feature order; quantized collections cache the order of the first call, so every lookup
        # passes every feature, in this order.
        self._seq_keys = [f for t in tables for f in t.feature_names]
        self._target_keys = {t.target_column: i for i, t in enumerate(cfg.features.sequence)}
        self._history_keys = {t.history_column: i for i, t in enumerate(cfg.features.sequence)}
        self._profile_keys = [p.column for p in cfg.features.profile]

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, cfg: ExperimentConfig | None = None, **kwargs: Any
    ) -> Predictor:
        """A predictor for a trainer run folder (``<output_dir>``) or checkpoint folder."""
        ckpt, cfg = resolve_run(path, cfg)
        model, meta = load_model(ckpt, cfg)
        pred = cls(model, cfg, **kwargs)
        pred.checkpoint_meta = meta
        return pred

    # ---------------------------------------------------------------------------------------- public API

    def rank(
        self,
        user: int | Mapping[str, Any],
        history: Mapping[str, Any],
        candidates: Mapping[str, Any],
        *,
        profile: Mapping[str, Any] | None = None,
        timestamps: Any = None,
        history_version: str | int | None = None,
        attention: bool = False,
    ) -> Ranking:
        """Score the candidates of one user.

        Args:
            user: the user id, or a mapping with ``user_id`` and profile columns.
            history: sequence table (or history column) -> ids, oldest first; may hold ``timestamps``.
            candidates: sequence table (or target column) -> ids.
            profile: profile column -> id (merged over ``user``'s mapping).
            timestamps: the behaviours' unix seconds (instead of ``history["timestamps"]``).
            history_version: the caller's version of this user's history (cache key).
            attention: also return the attention maps.
        """
        request = make_request(
            user, history, candidates, profile=profile, timestamps=timestamps, history_version=history_version
        )
        return self.rank_many([request], attention=attention)[0]

    def rank_many(
        self, requests: Sequence[RankRequest | Mapping[str, Any]], *, attention: bool = False
    ) -> list[Ranking]:
        """Score many requests in one batched pass (see the module docstring). Raises :class:`RequestError`
        for the first invalid request (nothing is scored then)."""
        prepared = [self.validator.prepare(r) for r in requests]
        return self.rank_prepared(prepared, attention=attention)

    def prepare(self, request: RankRequest | Mapping[str, Any]) -> PreparedRequest:
        """Validate one request."""
        return self.validator.prepare(request)

    def cache_info(self) -> CacheInfo:
        return CacheInfo(**vars(self.cache.info))

    def clear_cache(self) -> None:
        self.cache.clear()

    # ------------------------------------------------------------------------------------------ internals

    def _sequence_kjt(self, hist: list[np.ndarray | None], cands: list[np.ndarray]) -> KeyedJaggedTensor:
        """One KJT over all sequence features with stride R = len(cands): the candidates of every request
        and the histories of those in ``hist`` that are not None (others get length 0)."""
        r = len(cands)
        values, lengths = [], []
        zeros = np.zeros(r, dtype=np.int64)
        for key in self._seq_keys:
            if key in self._target_keys:
                j = self._target_keys[key]
                values += [c[j] for c in cands]
                lengths.append(np.array([c.shape[1] for c in cands], dtype=np.int64))
            elif key in self._history_keys:
                j = self._history_keys[key]
                values += [h[j] for h in hist if h is not None]
                lengths.append(np.array([h.shape[1] if h is not None else 0 for h in hist], dtype=np.int64))
            else:  # DIEN's negatives: only read by the training loss
                lengths.append(zeros)
        flat = np.concatenate(values) if values else np.zeros(0, dtype=np.int64)
        return KeyedJaggedTensor.from_lengths_sync(
            self._seq_keys, torch.from_numpy(flat), torch.from_numpy(np.concatenate(lengths))
        )

    def _profile_embeddings(self, profiles: np.ndarray) -> torch.Tensor | None:
        if self.model.profile_embeddings is None:
            return None
        u = profiles.shape[0]
        kjt = KeyedJaggedTensor.from_lengths_sync(
            self._profile_keys,
            torch.from_numpy(np.ascontiguousarray(profiles.T).reshape(-1)),
            torch.ones(u * len(self._profile_keys), dtype=torch.int64),
        )
        return self.model.profile_embeddings(kjt).values()

    @torch.inference_mode()
    def rank_prepared(self, prepared: Sequence[PreparedRequest], *, attention: bool = False) -> list[Ranking]:
        """:meth:`rank_many` on already validated requests."""
        if not prepared:
            return []
        with self._lock:
            return self._rank(list(prepared), attention)

    def _rank(self, prepared: list[PreparedRequest], attention: bool) -> list[Ranking]:
        states: list[dict[str, torch.Tensor] | None] = []
        hits: list[bool] = []
        # (cache key, digest) -> the request computing it: a user repeated in one call is computed once (the
        # digest too, in case a caller reuses a version for two different histories in one call).
        missing: dict[tuple[Any, str], int] = {}
        for i, p in enumerate(prepared):
            state = self.cache.get(p.cache_key, p.digest)
            hits.append(state is not None)
            states.append(state)
            if state is None and (p.cache_key, p.digest) not in missing:
                missing[(p.cache_key, p.digest)] = i
        compute = sorted(missing.values())
        compute_set = set(compute)
        hist = [p.history if i in compute_set else None for i, p in enumerate(prepared)]
        seq = self.model.sequence_embeddings(self._sequence_kjt(hist, [p.candidates for p in prepared]))
        cand_emb = torch.cat([seq[t.target_column].values() for t in self.features.sequence], dim=-1)

        if compute:
            beh = torch.cat([seq[t.history_column].values() for t in self.features.sequence], dim=-1)
            lengths = torch.tensor([prepared[i].history_length for i in compute], dtype=torch.int64)
            ts = torch.from_numpy(np.concatenate([prepared[i].timestamps for i in compute]))
            batched = self.scorer.user_side_jagged(beh, lengths, ts)
            fresh = split_state(batched, lengths, self.scorer.history_fields)
            profile = self._profile_embeddings(np.stack([prepared[i].profile for i in compute]))
            computed: dict[tuple[Any, str], dict[str, torch.Tensor]] = {}
            for k, i in enumerate(compute):
                if profile is not None:
                    fresh[k]["profile"] = profile[k].clone()
                p = prepared[i]
                self.cache.put(p.cache_key, p.digest, fresh[k])
                computed[(p.cache_key, p.digest)] = fresh[k]
            states = [
                s if s is not None else computed[(p.cache_key, p.digest)] for s, p in zip(states, prepared)
            ]

        batch_state, _ = stack_states(states, self.scorer.history_fields)
        profile_rows = batch_state.pop("profile", None)
        counts = torch.tensor([p.num_candidates for p in prepared], dtype=torch.int64)
        owner = torch.repeat_interleave(torch.arange(len(prepared)), counts)
        gather = index_gather(owner, len(prepared))
        logits, maps = self.scorer.logits(profile_rows, batch_state, gather, cand_emb)

        out: list[Ranking] = []
        sizes = counts.tolist()
        per_request = logits.float().split(sizes)
        split_maps = {k: v.split(sizes) for k, v in maps.items()} if attention else {}
        for i, p in enumerate(prepared):
            lg = per_request[i].numpy().astype(np.float64)
            scores = 1.0 / (1.0 + np.exp(-lg))
            att = None
            if attention:
                att = {}
                for k, parts in split_maps.items():
                    a = parts[i]
                    if k in ("history", "evolution"):
                        a = a[:, : p.history_length]
                    att[k] = a.float().numpy().copy()
            out.append(
                Ranking(
                    logits=lg,
                    scores=scores,
                    order=np.argsort(-lg, kind="stable"),
                    cache_hit=hits[i],
                    truncated=p.truncated,
                    attention=att,
                )
            )
        return out

    def explain(
        self,
        user: int | Mapping[str, Any],
        history: Mapping[str, Any],
        candidates: Mapping[str, Any],
        **kwargs: Any,
    ):
        """The attention of the model over the user's history for each candidate
        (:class:`~din_torchrec.serving.explain.Explanation`); same arguments as :meth:`rank`."""
        from din_torchrec.serving.explain import explain

        return explain(self, user, history, candidates, **kwargs)


# --------------------------------------------------------------------------------------------------------
# Requests from training batches (tests, benchmarks, explain --sample)
# --------------------------------------------------------------------------------------------------------


def requests_from_batch(batch: Batch, cfg: ExperimentConfig) -> list[RankRequest]:
    """One single-candidate request per sample of a training/eval batch (the sample's target as candidate)."""
    f = cfg.features
    seq = batch.sequence_features.to_dict()
    prof = batch.profile_features.to_dict()
    b = batch.batch_size
    lengths = batch.hist_lengths.tolist()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    targets = {t.name: seq[t.target_column].values().numpy() for t in f.sequence}
    hists = {t.name: seq[t.history_column].values().numpy() for t in f.sequence}
    profiles = {p.column: prof[p.column].values().numpy() for p in f.profile}
    ts = batch.hist_timestamps.numpy()
    users = batch.user_ids.numpy()
    out = []
    for i in range(b):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        out.append(
            RankRequest(
                user_id=int(users[i]),
                history={name: v[lo:hi] for name, v in hists.items()},
                candidates={name: v[i : i + 1] for name, v in targets.items()},
                profile={c: int(v[i]) for c, v in profiles.items()},
                timestamps=ts[lo:hi],
            )
        )
    return out


def batch_for_candidates(
    prepared: PreparedRequest, cfg: ExperimentConfig, with_negatives: bool = False
) -> Batch:
    """The training-style :class:`Batch` scoring one request the way the model is trained: one sample per
    candidate, each carrying the user's whole history (what a server without the user/candidate split
    runs). ``with_negatives`` adds the ``neg_*`` keys DIEN's collections expect (ids 0, unused in eval)."""
    from din_torchrec.data.negatives import negative_column

    f = cfg.features
    n, t = prepared.num_candidates, prepared.history_length
    keys, values, lengths = [], [], []
    for j, tab in enumerate(f.sequence):
        keys.append(tab.target_column)
        values.append(torch.from_numpy(prepared.candidates[j]))
        lengths.append(torch.ones(n, dtype=torch.int64))
    for j, tab in enumerate(f.sequence):
        keys.append(tab.history_column)
        values.append(torch.from_numpy(prepared.history[j]).repeat(n))
        lengths.append(torch.full((n,), t, dtype=torch.int64))
    if with_negatives:
        for tab in f.sequence:
            keys.append(negative_column(tab.history_column))
            values.append(torch.zeros(n * t, dtype=torch.int64))
            lengths.append(torch.full((n,), t, dtype=torch.int64))
    sequence = KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(values), torch.cat(lengths))
    prof_keys = [p.column for p in f.profile]
    profile = KeyedJaggedTensor.from_lengths_sync(
        prof_keys,
        torch.from_numpy(np.repeat(prepared.profile, n)) if prof_keys else torch.zeros(0, dtype=torch.int64),
        torch.ones(n * len(prof_keys), dtype=torch.int64),
    )
    return Batch(
        sequence_features=sequence,
        profile_features=profile,
        labels=torch.zeros(n),
        user_ids=torch.full((n,), prepared.user_id, dtype=torch.int64),
        hist_timestamps=torch.from_numpy(prepared.timestamps).repeat(n),
        hist_lengths=torch.full((n,), t, dtype=torch.int64),
        target_timestamps=torch.zeros(n, dtype=torch.int64),
    )
