"""Online serving of the DIN family: ranking with a factorised user/candidate forward and a user-state cache
(:class:`Predictor`), quantized tables, a ``torch.export`` artefact, attention explanations and an HTTP
service. See ``docs/serving.md``.

Names are imported lazily, so ``din_torchrec.serving.cli`` (loaded by the main CLI's parser) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Predictor": "din_torchrec.serving.predictor",
    "Ranking": "din_torchrec.serving.predictor",
    "load_model": "din_torchrec.serving.predictor",
    "RankRequest": "din_torchrec.serving.requests",
    "RequestError": "din_torchrec.serving.requests",
    "ServingPolicy": "din_torchrec.serving.requests",
    "Explanation": "din_torchrec.serving.explain",
    "quantize_model": "din_torchrec.serving.quantize",
    "quantization_report": "din_torchrec.serving.quantize",
    "export_model": "din_torchrec.serving.export",
    "load_exported": "din_torchrec.serving.export",
    "start_server": "din_torchrec.serving.server",
    "latency_benchmark": "din_torchrec.serving.bench",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'din_torchrec.serving' has no attribute {name!r}")
