"""The search path: query embeddings -> nearest index entries -> (the re-rank step) -> results.

:func:`search` is the one place a query meets the index. Its steps are kept apart so that the re-ranker of the
re-ranking issue slots in as :func:`rerank`: the first stage fetches ``rerank_top_k`` candidates when re-ranking is
on (``k`` otherwise), and :func:`rerank` re-orders the first ``rerank_top_k`` of them with the query images and
returns the best ``k``. Until a re-ranker exists, ``crossmetric serve`` refuses ``--rerank_top_k`` (it needs a model
exported with ``reranker/``), so :func:`rerank` only keeps the first ``k``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ServeError
from .index_watch import LoadedIndex
from .settings import MAX_K

Results = list[list[dict[str, Any]]]


def check_k(value: Any) -> int:
    """``k`` from a query parameter or JSON field: an integer from 1 to :data:`MAX_K` (422 otherwise)."""
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_K:
        raise ServeError("invalid_input", f"k must be an integer from 1 to {MAX_K}, got {str(value)[:40]!r}.")
    return value


def rerank(candidates: Results, k: int, query_images: list[Any] | None = None) -> Results:
    """The re-rank step after the index search: re-order each query's candidates, keep the best ``k``.

    No re-ranker is loaded in this version (the command refuses ``--rerank_top_k`` without one), so the first-stage
    order stands; the re-ranker scores ``(query_images[i], candidate)`` pairs here.
    """
    return [hits[:k] for hits in candidates]


def require_index(loaded: LoadedIndex | None) -> LoadedIndex:
    """``loaded``, or the 424 that says how to give the server an index."""
    if loaded is None:
        raise ServeError(
            "backend", "this server has no index: start it with --index INDEX (built by `crossmetric index build`)."
        )
    return loaded


def search(loaded: LoadedIndex | None, embeddings: np.ndarray, k: int, rerank_top_k: int | None = None) -> Results:
    """Per query row, its ``k`` nearest entries ``{"id", "label", "score", "path"}``, best first (blocking)."""
    loaded = require_index(loaded)
    first_stage = max(k, rerank_top_k or 0)
    candidates = loaded.index.search(embeddings, k=first_stage)
    return rerank(candidates, k)
