"""Switch the models onto the new fast paths *for a benchmark*, without editing the modules: what wiring them
would give, measured before it is done.

``enable_fast_paths()`` replaces, class-wide:

* ``TargetAttentionPooling.forward`` -> :func:`~din_torchrec.modules.fast_attention.fast_target_attention`
  (DIN);
* ``InterestExtractor.forward`` -> :func:`~din_torchrec.modules.fast_gru.bucketed_gru` (DIEN's GRU).

Same parameters, same outputs (tested in ``tests/bench/test_fast_paths.py``). ``disable_fast_paths()``
restores the originals; ``fast_paths()`` is the context manager.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_ORIGINALS: dict[str, Any] = {}


def enable_fast_paths() -> None:
    from din_torchrec.modules.attention import TargetAttentionPooling
    from din_torchrec.modules.fast_attention import fast_target_attention
    from din_torchrec.modules.fast_gru import bucketed_gru
    from din_torchrec.modules.interest_evolution import InterestExtractor

    if _ORIGINALS:
        return
    _ORIGINALS["attention"] = TargetAttentionPooling.forward
    _ORIGINALS["extractor"] = InterestExtractor.forward

    def attention_forward(self, behaviours, lengths, candidates):  # type: ignore[no-untyped-def]
        return fast_target_attention(self, behaviours, lengths, candidates)

    def extractor_forward(self, behaviours, lengths, layout=None):  # type: ignore[no-untyped-def]
        return bucketed_gru(self.gru, behaviours, lengths)

    TargetAttentionPooling.forward = attention_forward  # type: ignore[method-assign]
    InterestExtractor.forward = extractor_forward  # type: ignore[method-assign]


def disable_fast_paths() -> None:
    from din_torchrec.modules.attention import TargetAttentionPooling
    from din_torchrec.modules.interest_evolution import InterestExtractor

    if not _ORIGINALS:
        return
    TargetAttentionPooling.forward = _ORIGINALS.pop("attention")  # type: ignore[method-assign]
    InterestExtractor.forward = _ORIGINALS.pop("extractor")  # type: ignore[method-assign]


@contextlib.contextmanager
def fast_paths(enabled: bool = True) -> Iterator[None]:
    if not enabled:
        yield
        return
    enable_fast_paths()
    try:
        yield
    finally:
        disable_fast_paths()
