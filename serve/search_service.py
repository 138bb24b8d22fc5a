"""The search path: query embeddings -> nearest index entries -> (the re-rank step) -> results.

:func:`search` is the one place a query meets the index. Without ``--rerank_top_k`` it returns the index's ``k``
nearest, ``{"id", "label", "score", "path"}`` each. With it (a model exported with ``reranker/``, torch backend, an
index built with the head's tokens), :func:`rerank` takes over, exactly as ``crossmetric search --rerank_top_k K`` and
the ``image-retrieval`` pipeline do (:func:`~crossmetric.retrieval.reranking.search_and_rerank`): the first stage
fetches ``max(k, K)`` candidates, the first ``K`` are re-scored by the re-ranker
(:meth:`~crossmetric.modeling.reranking_crossmetric.CrossMetricReranker.rank`) on the tokens the index stores for them
and the query's own tokens, which came out of the same backbone pass as its embedding (the server's batch runs
:func:`~crossmetric.inference.embedding.embeddings_and_reranker_tokens`); items past ``K`` keep the embedding's order,
below them; the best ``k`` are returned. Each hit then also carries ``"cosine"`` (the embedding's score),
``"head_score"`` (None past ``K``) and ``"reranked"``; ``"score"`` is the fused score of a re-ranked item.

An index without head tokens, or with tokens another re-ranker reads, is refused: by the command before it starts
(:func:`check_index_folder_for_reranker`, from ``metadata.json`` alone), at load, and at every reload of the watched
folder (the previous index is then kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from ..retrieval.filter_spec import filter_from_request, typed_filter
from ..retrieval.reranking import check_index_for_reranker, search_and_rerank
from ..retrieval.storage import METADATA_FILE, read_metadata
from .errors import ServeError
from .index_watch import LoadedIndex
from .settings import MAX_K

Results = list[list[dict[str, Any]]]
Filter = dict[str, list[Any]]


@dataclass(frozen=True)
class Reranking:
    """The re-rank step's configuration: the loaded ``CrossMetricReranker`` and ``top_k`` (``--rerank_top_k``)."""

    reranker: Any
    top_k: int

    def check_index(self, index: Any) -> None:
        """Refuse an index this re-ranker cannot use (``check_index_for_reranker``'s one-line reasons)."""
        check_index_for_reranker(index, self.reranker)


def check_k(value: Any) -> int:
    """``k`` from a query parameter or JSON field: an integer from 1 to :data:`MAX_K` (422 otherwise)."""
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_K:
        raise ServeError("invalid_input", f"k must be an integer from 1 to {MAX_K}, got {str(value)[:40]!r}.")
    return value


def request_filter(value: Any) -> dict[str, list[Any]] | None:
    """A request's ``filter`` (a mapping, or ``COLUMN=VALUE[,VALUE...]`` strings) as ``{column: [values]}``; a
    filter of another shape is a 422 (``invalid_input``) saying the accepted forms."""
    try:
        return filter_from_request(value, "filter")
    except ValueError as error:
        raise ServeError("invalid_input", str(error)) from None


def check_filter_for(loaded: LoadedIndex | None, wanted: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
    """``wanted`` checked against the index of this moment (its columns; values converted to the columns' types):
    a 422 naming the column or value at fault, before any image is embedded."""
    if not wanted:
        return None
    try:
        return typed_filter(wanted, require_index(loaded).index, "filter")
    except ValueError as error:
        raise ServeError("invalid_input", str(error)) from None


def check_index_folder_for_reranker(folder: Path, reranker_config: Any) -> None:
    """:func:`~crossmetric.retrieval.reranking.check_index_for_reranker` on a saved index folder from its
    ``metadata.json`` alone (no vectors read): the command's refusal before it starts. A folder whose metadata
    cannot say is left to the full load, which names the file at fault."""
    if not (folder / METADATA_FILE).is_file():
        return
    stored = read_metadata(folder / METADATA_FILE).get("head_tokens")
    if stored:
        shape = stored.get("shape") if isinstance(stored, dict) else None
        if not isinstance(shape, list) or len(shape) != 2 or not all(isinstance(n, int) for n in shape):
            return
    described = SimpleNamespace(head_tokens_info=lambda: stored or None)  # the protocol's answer, from the manifest
    check_index_for_reranker(described, SimpleNamespace(config=reranker_config))


def rerank(
    loaded: LoadedIndex,
    embeddings: np.ndarray,
    tokens: np.ndarray | None,
    k: int,
    reranking: Reranking,
    filter: dict[str, list[Any]] | None = None,
) -> Results:
    """The re-rank step: per query (embeddings Q×D, re-ranker tokens Q×T×C), the index's ``max(k, K)`` nearest (that
    pass ``filter``) with the first ``K`` re-ranked and the rest in the embedding's order; the best ``k`` (blocking)."""
    if tokens is None:
        raise ValueError("re-ranking needs the queries' tokens: the server's batch did not return them")
    return search_and_rerank(loaded.index, reranking.reranker, embeddings, tokens, k, reranking.top_k, filter=filter)


def require_index(loaded: LoadedIndex | None) -> LoadedIndex:
    """``loaded``, or the 424 that says how to give the server an index."""
    if loaded is None:
        raise ServeError(
            "backend", "this server has no index: start it with --index INDEX (built by `crossmetric index build`)."
        )
    return loaded


def search(
    loaded: LoadedIndex | None,
    embeddings: np.ndarray,
    k: int,
    reranking: Reranking | None = None,
    tokens: np.ndarray | None = None,
    filter: dict[str, list[Any]] | None = None,
) -> Results:
    """Per query row, its ``k`` nearest entries ``{"id", "label", "score", "path"}`` that pass ``filter``, best first
    (blocking); with ``reranking`` (and the queries' ``tokens``), re-ranked by :func:`rerank`. A filter the index of
    this moment cannot apply (a reload dropped its column) is a 422."""
    loaded = require_index(loaded)
    try:
        if reranking is not None:
            return rerank(loaded, embeddings, tokens, k, reranking, filter)
        return loaded.index.search(embeddings, k=k, **({"filter": filter} if filter else {}))
    except ValueError as error:
        if not filter:
            raise
        raise ServeError("invalid_input", f"filter: {error}") from None
