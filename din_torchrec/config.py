"""Typed experiment configuration.

A YAML file is parsed once, at the edge (the CLI), into the dataclasses below; everything else takes
dataclasses. Parsing is strict: an unknown key, a value of the wrong type or a missing required value raises
:class:`ConfigError` naming the key path (``training.lr_dense``) and what was expected.

Overrides use dotted paths, ``--set training.lr_dense=0.01 model.name=din``; their values are YAML scalars or
flow sequences (``model.mlp_hidden=[64,32]``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


# --------------------------------------------------------------------------------------------------------
# Dataclasses
# --------------------------------------------------------------------------------------------------------


@dataclass
class GeneratorConfig:
    """Synthetic behaviour logs with planted structure (see ``din_torchrec.data.generator``)."""

    num_users: int = 20_000
    num_items: int = 20_000
    num_categories: int = 100
    train_samples: int = 200_000
    test_samples: int = 50_000
    samples_per_user: int = 8
    min_history: int = 1
    max_history: int = 50
    interests_per_user: int = 3
    interest_focus: float = 0.8
    zipf_exponent: float = 1.1
    latent_dim: int = 16
    item_noise: float = 0.6
    click_sharpness: float = 6.0
    click_bias: float = -0.5
    num_age_buckets: int = 8
    rows_per_file: int = 500_000
    row_group_size: int = 65_536
    seed: int = 0
    # Added for the generator (all with defaults; see din_torchrec.data.generator).
    click_threshold: float = 0.75
    profile_strength: float = 0.25
    mean_gap_seconds: float = 3600.0
    start_timestamp: int = 1_700_000_000
    # Interest drift (DIEN's premise): phased interests, clicks driven by the recent behaviours.
    drift: bool = False
    drift_phases: int = 3
    drift_recent: int = 10
    drift_old_share: float = 0.5
    # Sessions (DSIN's premise): single-themed bursts, clicks driven by how many sessions match.
    sessions: bool = False
    session_gap_seconds: int = 1800
    session_min_behaviors: int = 1
    session_max_behaviors: int = 10
    session_inner_gap_seconds: float = 120.0
    session_break_seconds: float = 43_200.0
    session_window: int = 3
    session_click_cap: int = 3
    session_click_threshold: float = 0.4


@dataclass
class DataConfig:
    """Where the samples are and how they are batched."""

    dir: str = "data/generated"
    train_path: str = "train"
    eval_path: str = "test"
    frequency_path: str = "frequencies.npz"
    max_history: int = 50
    batch_size: int = 1024
    eval_batch_size: int = 4096
    shuffle_buffer: int = 65_536
    read_chunk_rows: int = 65_536
    # Batches read ahead on a background thread: -1 (default) picks 2 when a core is free for the reader
    # (a GPU computes, or the process may use >= 2 more CPUs than torch's threads), else 0 (read inline).
    prefetch_batches: int = -1
    # Keep the validated rows in memory after loading them once (before training): later epochs shuffle and
    # batch from RAM without decoding parquet again. For data sets that fit in memory (int64 ids: ~1.3 GB per
    # 1M rows of history 50 with two sequence columns and timestamps); off, memory is bounded by the shuffle
    # buffer.
    cache_in_memory: bool = False
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)

    def resolve(self, path: str) -> Path:
        """``path`` relative to :attr:`dir` unless absolute."""
        p = Path(path)
        return p if p.is_absolute() else Path(self.dir) / p


@dataclass
class SequenceTableConfig:
    """One table of the EmbeddingCollection, shared by the candidate and the behaviour sequence."""

    name: str
    num_embeddings: int
    target_column: str
    history_column: str


@dataclass
class ProfileTableConfig:
    """One pooled (EmbeddingBagCollection) table for a user-profile column."""

    name: str
    num_embeddings: int
    column: str
    embedding_dim: int | None = None


@dataclass
class FeaturesConfig:
    """Embedding tables. Sequence tables share one dim (an EmbeddingCollection needs that)."""

    embedding_dim: int = 16
    timestamp_column: str = "hist_timestamps"
    target_timestamp_column: str = "target_timestamp"
    user_column: str = "user_id"
    label_column: str = "label"
    sequence: list[SequenceTableConfig] = field(
        default_factory=lambda: [
            SequenceTableConfig("item", 20_001, "target_item_id", "hist_item_ids"),
            SequenceTableConfig("category", 101, "target_cate_id", "hist_cate_ids"),
        ]
    )
    profile: list[ProfileTableConfig] = field(
        default_factory=lambda: [
            ProfileTableConfig("user", 20_001, "user_id"),
            ProfileTableConfig("age", 8, "user_age"),
            ProfileTableConfig("gender", 2, "user_gender"),
        ]
    )

    def table_sizes(self) -> dict[str, int]:
        """``column -> num_embeddings`` for every id column (the reader's range check)."""
        sizes: dict[str, int] = {}
        for t in self.sequence:
            sizes[t.target_column] = t.num_embeddings
            sizes[t.history_column] = t.num_embeddings
        for p in self.profile:
            sizes[p.column] = p.num_embeddings
        return sizes


@dataclass
class DIENConfig:
    """DIEN: GRU interest extractor, auxiliary next-behaviour loss, attention-gated interest evolution."""

    gru_hidden: int = 0
    evolution: Literal["augru", "agru", "aigru"] = "augru"
    aux_loss_weight: float = 1.0
    aux_hidden: list[int] = field(default_factory=lambda: [100, 50])
    negative_sampling: Literal["uniform", "popularity"] = "uniform"
    item_features_path: str = "item_features.npz"


@dataclass
class DSINConfig:
    """DSIN: time-gap sessions, bias encoding, self-attention per session, Bi-LSTM across sessions.

    ``ffn_hidden``: width of the extractor's feed-forward layer; null -> 4 x behaviour width, 0 -> none.
    """

    session_gap_seconds: int = 1800
    max_sessions: int = 5
    max_session_length: int = 10
    heads: int = 4
    ffn_hidden: int | None = None
    lstm_hidden: int = 16


@dataclass
class ModelConfig:
    """Which interaction module and the sizes of its MLPs."""

    name: Literal["base", "din", "dien", "dsin"] = "din"
    attention_hidden: list[int] = field(default_factory=lambda: [80, 40])
    attention_activation: Literal["dice", "prelu", "relu", "sigmoid"] = "dice"
    attention_normalization: Literal["softmax", "none"] = "none"
    mlp_hidden: list[int] = field(default_factory=lambda: [200, 80])
    mlp_activation: Literal["dice", "prelu", "relu"] = "dice"
    dice_eps: float = 1e-8
    dice_momentum: float = 0.01
    dien: DIENConfig = field(default_factory=DIENConfig)
    dsin: DSINConfig = field(default_factory=DSINConfig)


@dataclass
class RegularizationConfig:
    """Mini-batch-aware L2 on the embedding rows a batch touched.

    ``mode="count"``: each row weighted by (count in batch) / n_j; ``"indicator"``: by 1 / n_j if present
    (the DIN paper's I(x_j != 0)).
    """

    coefficient: float = 0.0
    mode: Literal["count", "indicator"] = "count"


@dataclass
class TableShardingConfig:
    """Planner constraints for one table."""

    sharding_types: list[str] = field(default_factory=list)
    compute_kernels: list[str] = field(default_factory=list)


@dataclass
class TrainingConfig:
    """Optimisation, evaluation and outputs."""

    epochs: int = 2
    lr_dense: float = 1e-3
    dense_optimizer: Literal["adam", "sgd", "adagrad"] = "adam"
    sparse_optimizer: Literal["rowwise_adagrad", "adagrad", "sgd"] = "rowwise_adagrad"
    lr_sparse: float = 0.05
    grad_clip_norm: float = 5.0
    loss: Literal["bce", "focal"] = "bce"
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accumulation_steps: int = 1
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = 50
    max_steps_per_epoch: int = 0
    progress: bool = True
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    sharding: dict[str, TableShardingConfig] = field(default_factory=dict)
    plan_path: str = ""
    checkpoint_every_steps: int = 0
    resume: bool = False
    num_threads: int = 0
    compile: bool = False  # torch.compile the dense hot spots (training/compile.py); needs a C++ compiler
    # glibc keeps freed large blocks for reuse instead of page-faulting them back every step, and numpy asks
    # for no huge pages where the kernel would compact memory for them on first touch (utils/allocator.py; no
    # effect off glibc / Linux).
    malloc_tuning: bool = True
    # FBGEMM's check of every looked-up id against its table, on every batch ("warning": clamp a bad id and
    # log; "fatal": raise; "none": skip). The readers check every id of every file against its table before a
    # batch exists (data/validation.py) and negatives are drawn in range, so the check repeats theirs: 0.2 ms
    # of a 47 ms DIEN step here. Set "warning" or "fatal" when the model gets batches from elsewhere.
    embedding_bounds_check: Literal["none", "warning", "fatal"] = "none"
    # Dice and DIEN's recurrences through native CPU kernels (din_torchrec/ops), built on first use with the
    # host's C++ compiler; the PyTorch paths run without one.
    native_kernels: bool = True


@dataclass
class ExperimentConfig:
    """The whole experiment: one YAML file."""

    data: DataConfig = field(default_factory=DataConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def validate(self) -> ExperimentConfig:
        """Cross-field checks that single types cannot express."""
        if not self.features.sequence:
            raise ConfigError("features.sequence: expected at least one sequence table (the item table)")
        names = [t.name for t in self.features.sequence] + [t.name for t in self.features.profile]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"features: table names must be unique, repeated: {sorted(dup)}")
        columns = [c for t in self.features.sequence for c in (t.target_column, t.history_column)]
        columns += [t.column for t in self.features.profile]
        dupc = {c for c in columns if columns.count(c) > 1}
        if dupc:
            raise ConfigError(f"features: each column feeds one table, repeated: {sorted(dupc)}")
        for path, value in [
            ("data.batch_size", self.data.batch_size),
            ("data.eval_batch_size", self.data.eval_batch_size),
            ("data.max_history", self.data.max_history),
            ("features.embedding_dim", self.features.embedding_dim),
            ("training.epochs", self.training.epochs),
        ]:
            if value <= 0:
                raise ConfigError(f"{path}: expected a positive integer, got {value}")
        dims = [("features.embedding_dim", self.features.embedding_dim)] + [
            (f"features.profile[{i}].embedding_dim", p.embedding_dim)
            for i, p in enumerate(self.features.profile)
            if p.embedding_dim is not None
        ]
        for path, dim in dims:
            if dim % 4 != 0:
                raise ConfigError(
                    f"{path}: expected a multiple of 4 (FBGEMM's fused tables need it), got {dim}"
                )
        for i, t in enumerate(self.features.sequence):
            if t.num_embeddings <= 0:
                raise ConfigError(
                    f"features.sequence[{i}].num_embeddings: expected > 0, got {t.num_embeddings}"
                )
        for i, p in enumerate(self.features.profile):
            if p.num_embeddings <= 0:
                raise ConfigError(
                    f"features.profile[{i}].num_embeddings: expected > 0, got {p.num_embeddings}"
                )
        known = set(names)
        for table in self.training.sharding:
            if table not in known:
                raise ConfigError(f"training.sharding.{table}: no such table; tables are {sorted(known)}")
        if self.training.regularization.coefficient < 0:
            raise ConfigError("training.regularization.coefficient: expected >= 0")
        if not 0.0 <= self.training.label_smoothing < 1.0:
            raise ConfigError(
                f"training.label_smoothing: expected in [0, 1), got {self.training.label_smoothing}"
            )
        if not 0.0 <= self.training.focal_alpha <= 1.0:
            raise ConfigError(f"training.focal_alpha: expected in [0, 1], got {self.training.focal_alpha}")
        if self.training.focal_gamma < 0:
            raise ConfigError(f"training.focal_gamma: expected >= 0, got {self.training.focal_gamma}")
        if self.data.prefetch_batches < -1:
            raise ConfigError(
                f"data.prefetch_batches: expected -1 (auto), 0 (read inline) or a depth > 0, got "
                f"{self.data.prefetch_batches}"
            )
        if self.training.grad_accumulation_steps < 1:
            raise ConfigError(
                f"training.grad_accumulation_steps: expected >= 1, got {self.training.grad_accumulation_steps}"
            )
        if self.training.precision == "fp16":
            # Loss scaling cannot work here: the fused embedding optimizers apply each gradient inside the
            # backward of the lookup, before a GradScaler could unscale it or skip an overflowing step.
            raise ConfigError(
                "training.precision: fp16 needs a GradScaler, which the fused (in-backward) embedding "
                "optimizers cannot honour; use bf16 (no loss scaling needed; native on CPUs with AVX512-BF16/AMX "
                "and on Ampere/Hopper GPUs)"
            )
        width = self.features.embedding_dim * len(self.features.sequence)
        if self.model.name == "dsin" and width % self.model.dsin.heads != 0:
            raise ConfigError(
                f"model.dsin.heads: the behaviour width {width} (embedding_dim x sequence tables) must be "
                f"divisible by the number of heads, got {self.model.dsin.heads}"
            )
        for path, value in [
            ("model.dsin.max_sessions", self.model.dsin.max_sessions),
            ("model.dsin.max_session_length", self.model.dsin.max_session_length),
            ("model.dsin.lstm_hidden", self.model.dsin.lstm_hidden),
            ("model.dsin.heads", self.model.dsin.heads),
        ]:
            if value <= 0:
                raise ConfigError(f"{path}: expected a positive integer, got {value}")
        return self


# --------------------------------------------------------------------------------------------------------
# Strict conversion from plain data
# --------------------------------------------------------------------------------------------------------

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (list, typing.List):  # noqa: UP006
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin in (dict, typing.Dict):  # noqa: UP006
        return f"a mapping of {_type_name(get_args(tp)[1])}"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, typing.Dict):  # noqa: UP006
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        _, val_tp = get_args(tp)
        return {str(k): _convert(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected str, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp!r}")  # a programming error, named anyway


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types with the key path."""
    where = path or "<root>"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping ({cls.__name__}), got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        key = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{key}: unknown key; {where} accepts {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{key}: required value missing (expected {_type_name(hints[name])})")
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Plain data (for YAML/JSON) from a config dataclass."""
    return dataclasses.asdict(cfg)


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: cannot set a key below {p!r}, which holds {nxt!r}")
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["a.b=1", "c=[1,2]"]`` -> ``[("a.b", 1), ("c", [1, 2])]``; values parsed as YAML."""
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. training.lr_dense=0.01")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        out.append((key, value))
    return out


def add_config_arguments(
    parser: Any, config_help: str = "experiment YAML (default: built-in defaults)"
) -> None:
    """``--config FILE`` and repeatable ``--set KEY=VALUE`` on an argparse parser (every CLI command)."""
    parser.add_argument("--config", "-c", help=config_help)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.lr_dense=0.01 (repeatable)",
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (or the defaults when ``path`` is None) and apply overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(loaded).__name__}")
        tree = loaded or {}
    for key, value in parse_overrides(overrides):
        _set_path(tree, key, value)
    try:
        return from_dict(ExperimentConfig, tree).validate()
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{path}: {e}") from e
        raise


def dump_config(cfg: ExperimentConfig) -> str:
    """YAML text of a config (written beside every run's outputs)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
