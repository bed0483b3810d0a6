"""Quantized embedding tables for serving (TorchRec's quantized collections) and what they cost in AUC.

:func:`quantize_model` copies a trained model and swaps its ``EmbeddingCollection`` /
``EmbeddingBagCollection`` for ``torchrec.quant`` ones through
:func:`torchrec.inference.modules.quantize_inference_model` (row-wise int8 or int4 with an fp16 scale and
bias per row, FBGEMM's CPU inference kernels; the dense modules stay fp32). The model's ``forward`` and the
:class:`~din_torchrec.serving.predictor.Predictor` run unchanged on the result.

:func:`quantization_report` evaluates fp32 and each quantized variant on a held-out split and returns the
AUC / gAUC / logloss change and the embedding memory of each (bytes actually held by the tables: FBGEMM's
quantized rows include their scale/bias and row alignment).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from din_torchrec.config import ExperimentConfig
from din_torchrec.models.base import SequenceCTRModel

DTYPES: dict[str, torch.dtype] = {"int8": torch.qint8, "int4": torch.quint4x2, "fp16": torch.float16}


def _dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError as e:
        raise ValueError(f"quantization dtype: expected one of {sorted(DTYPES)}, got {name!r}") from e


def table_names(model: SequenceCTRModel) -> list[str]:
    names = [t.name for t in model.features.sequence]
    if model.profile_embeddings is not None:
        names += [p.name for p in model.features.profile]
    return names


def quantize_model(model: SequenceCTRModel, dtype: str | Mapping[str, str] = "int8") -> SequenceCTRModel:
    """A copy of ``model`` (eval mode) with quantized embedding tables.

    Args:
        dtype: ``"int8"``, ``"int4"`` or ``"fp16"`` for every table, or table name -> one of those (tables
            not named stay int8, TorchRec's default).
    """
    names = table_names(model)
    if isinstance(dtype, str):
        per_table = {n: _dtype(dtype) for n in names}
    else:
        unknown = sorted(set(dtype) - set(names))
        if unknown:
            raise ValueError(f"quantization: unknown tables {unknown}; the model has {names}")
        per_table = {n: _dtype(dtype.get(n, "int8")) for n in names}
    from torchrec.inference.modules import quantize_inference_model
    from torchrec.quant.embedding_modules import MODULE_ATTR_CACHE_FEATURES_ORDER

    q = copy.deepcopy(model).eval()
    # quantize_inference_model swaps child modules only: the collections are children of the model.
    q = quantize_inference_model(q, per_table_weight_dtype=per_table).eval()
    # The quantized collections would otherwise cache the key order of their first input and apply it,
    # unchecked, to every later one (the reader's batches and the predictor's lookups order keys differently).
    for m in q.modules():
        if getattr(m, MODULE_ATTR_CACHE_FEATURES_ORDER, False):
            setattr(m, MODULE_ATTR_CACHE_FEATURES_ORDER, False)
    return q


def _tbe_bytes(module: nn.Module) -> int:
    total = 0
    for tbe in getattr(module, "tbes", []):
        for name in ("weights_host", "weights_dev", "weights_uvm"):
            t = getattr(tbe, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def embedding_memory(model: SequenceCTRModel) -> dict[str, int]:
    """Bytes held by the embedding tables: ``{"sequence", "profile", "total"}`` (fp32 or quantized)."""
    out = {}
    for key, module in (("sequence", model.sequence_embeddings), ("profile", model.profile_embeddings)):
        if module is None:
            out[key] = 0
        elif isinstance(module, (EmbeddingCollection, EmbeddingBagCollection)):
            out[key] = sum(p.numel() * p.element_size() for p in module.parameters())
        else:
            out[key] = _tbe_bytes(module)
    out["total"] = out["sequence"] + out["profile"]
    return out


@torch.no_grad()
def evaluate_model(
    model: nn.Module, cfg: ExperimentConfig, split: str = "eval", max_batches: int = 0
) -> dict[str, float]:
    """AUC, gAUC, logloss of an unsharded model on a split of ``cfg``'s data (one process)."""
    from din_torchrec.distributed.env import DistEnv
    from din_torchrec.training.metrics import ctr_metrics
    from din_torchrec.training.trainer import make_reader

    if split not in ("eval", "train"):
        raise ValueError(f"split: expected 'eval' or 'train', got {split!r}")
    eval_cfg = copy.deepcopy(cfg)
    if split == "train":
        eval_cfg.data.eval_path = cfg.data.train_path
    # The trainer's evaluation reader (DIEN's negatives included when the model's collections expect them).
    reader = make_reader(eval_cfg, DistEnv(0, 1, 0, 1, torch.device("cpu"), "gloo"), "eval", None)
    model.eval()
    logits, labels, users = [], [], []
    for i, batch in enumerate(reader):
        if max_batches and i >= max_batches:
            break
        keep = batch.valid_mask() > 0
        logits.append(model(batch).logits.float()[keep])
        labels.append(batch.labels[keep])
        users.append(batch.user_ids[keep])
    return ctr_metrics(torch.cat(logits).double(), torch.cat(labels).double(), torch.cat(users))


def quantization_report(
    model: SequenceCTRModel,
    cfg: ExperimentConfig,
    dtypes: Sequence[str] = ("int8", "int4"),
    split: str = "eval",
    max_batches: int = 0,
) -> dict[str, Any]:
    """fp32 versus quantized tables on a held-out split.

    Returns ``{"fp32": {auc, gauc, logloss, embedding_bytes}, "<dtype>": {..., "auc_change",
    "logloss_change", "memory_saved_bytes", "memory_ratio"}, "split", "samples"}`` (changes are quantized
    minus fp32; ``memory_ratio`` = quantized / fp32 bytes).
    """
    base = evaluate_model(model, cfg, split, max_batches)
    mem = embedding_memory(model)
    report: dict[str, Any] = {
        "split": split,
        "samples": base.get("samples"),
        "fp32": {**_headline(base), "embedding_bytes": mem["total"]},
    }
    for name in dtypes:
        q = quantize_model(model, name)
        m = evaluate_model(q, cfg, split, max_batches)
        qmem = embedding_memory(q)
        report[name] = {
            **_headline(m),
            "embedding_bytes": qmem["total"],
            "auc_change": m["auc"] - base["auc"],
            "gauc_change": m["gauc"] - base["gauc"],
            "logloss_change": m["logloss"] - base["logloss"],
            "memory_saved_bytes": mem["total"] - qmem["total"],
            "memory_ratio": qmem["total"] / max(mem["total"], 1),
        }
    return report


def _headline(m: dict[str, float]) -> dict[str, float]:
    return {k: float(m[k]) for k in ("auc", "gauc", "logloss") if k in m}


def quantization_report_for_run(run: str | Path, **kwargs: Any) -> dict[str, Any]:
    """:func:`quantization_report` for a trainer run folder (``<output_dir>``) or checkpoint folder."""
    from din_torchrec.serving.predictor import load_model, resolve_run

    ckpt, cfg = resolve_run(run)
    model, _ = load_model(ckpt, cfg)
    return quantization_report(model, cfg, **kwargs)
