"""Retrieve, then re-rank at query time: an index's K nearest re-scored by the model's re-ranker, the rest in place.

As OML's ``PairwiseReranker``: the search returns the embedding's order; only its first ``rerank_top_k`` items are
re-scored, by :meth:`CrossMetricReranker.rank` on the tokens the index stores for them (no backbone pass for a
gallery item) and the query's own, from the same backbone pass as its embedding. Items past K keep the embedding's
order and score, below the re-ranked ones; nothing the search did not return is brought in.

Each result is the index's ``{"id", "label", "score", "path"}`` plus ``"cosine"`` (the embedding's score),
``"head_score"`` (the head's similarity; None past K) and ``"reranked"``; ``"score"`` is the fused score for the
re-ranked items (the cosine when the re-ranker keeps the embedding's order) and the cosine past K.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..modeling.reranker_inputs import RerankFeatures


def check_rerank_top_k(value: Any, name: str = "rerank_top_k") -> int:
    """``value`` if it is an integer >= 2, else ``ValueError`` (re-ranking one candidate changes nothing)."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 2:
        raise ValueError(f"{name} must be an integer >= 2 (the candidates re-scored per query), got {value!r}.")
    return int(value)


def check_index_for_reranker(index: Any, reranker: Any) -> None:
    """Refuse an index without the head's tokens, or with tokens another re-ranker reads (one-line reasons)."""
    stored = index.head_tokens
    if stored is None:
        raise ValueError(
            "the index holds no head tokens to re-rank with: rebuild it with `crossmetric index build --model MODEL` "
            "(with a model that has a re-ranker, the torch backend stores them)."
        )
    config = reranker.config
    if stored.tokens.shape[2] != config.token_dim or stored.token_stage != config.token_stage:
        raise ValueError(
            f"the index's head tokens ({stored.tokens.shape[2]} channels from {stored.token_stage!r}) are not the "
            f"ones this re-ranker reads ({config.token_dim} from {config.token_stage!r}): use the index of its model."
        )


def rerank_hits(
    reranker: Any,
    index: Any,
    query_embedding: np.ndarray,
    query_tokens: np.ndarray,
    scores: np.ndarray,
    rows: np.ndarray,
    top_k: int,
    rerank_top_k: int,
) -> list[dict[str, Any]]:
    """One query's results: its search ``rows``/``scores`` (embedding order) with the first ``rerank_top_k``
    re-ranked, the rest in place; the first ``top_k`` returned."""
    keep = rows >= 0
    rows, scores = rows[keep], scores[keep]
    head = rows[:rerank_top_k]
    stored = RerankFeatures(index.embeddings[head], index.head_tokens.tokens[head])
    ranking = reranker.rank(RerankFeatures(query_embedding, query_tokens), stored)
    results = []
    for hit in ranking:
        row = int(head[hit["corpus_id"]])
        extra = {"cosine": hit["cosine"], "head_score": hit["head_score"], "reranked": True}
        results.append(_result(index, row, hit["score"], extra))
    for row, score in zip(rows[rerank_top_k:].tolist(), scores[rerank_top_k:].tolist()):
        results.append(_result(index, row, score, {"cosine": score, "head_score": None, "reranked": False}))
    return results[:top_k]


def _result(index: Any, row: int, score: float, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": index.ids[row],
        "label": index.labels[row] if index.labels is not None else None,
        "score": float(score),
        "path": index.paths[row] if index.paths is not None else None,
        **extra,
    }


def search_and_rerank(
    index: Any,
    reranker: Any,
    query_embeddings: Any,
    query_tokens: Any,
    top_k: int,
    rerank_top_k: int,
    *,
    ef_search: int | None = None,
    nprobe: int | None = None,
) -> list[list[dict[str, Any]]]:
    """For each query (embeddings Q×D, tokens Q×T×C), the index's ``max(top_k, rerank_top_k)`` nearest with the
    first ``rerank_top_k`` re-ranked (:func:`rerank_hits`), ``top_k`` returned."""
    check_index_for_reranker(index, reranker)
    embeddings = np.asarray(query_embeddings, dtype=np.float32).reshape(-1, index.dim)
    tokens = np.asarray(query_tokens, dtype=np.float32)
    scores, rows = index.search_arrays(embeddings, max(top_k, rerank_top_k), ef_search=ef_search, nprobe=nprobe)
    return [
        rerank_hits(reranker, index, embeddings[q], tokens[q], scores[q], rows[q], top_k, rerank_top_k)
        for q in range(len(embeddings))
    ]
