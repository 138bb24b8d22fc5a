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
    """Refuse an index without the head's tokens, or with tokens another re-ranker reads (one-line reasons).

    Asks only the index protocol (:meth:`~.protocol.GalleryIndex.head_tokens_info`), so any engine can be checked."""
    stored = index.head_tokens_info()
    if stored is None:
        raise ValueError(
            "the index holds no head tokens to re-rank with: rebuild it with `crossmetric index build --model MODEL` "
            "(with a model that has a re-ranker, the torch backend stores them)."
        )
    config = reranker.config
    channels, stage = stored["shape"][1], stored.get("token_stage")
    if channels != config.token_dim or stage != config.token_stage:
        raise ValueError(
            f"the index's head tokens ({channels} channels from {stage!r}) are not the "
            f"ones this re-ranker reads ({config.token_dim} from {config.token_stage!r}): use the index of its model."
        )


def rerank_hits(
    reranker: Any,
    index: Any,
    query_embedding: np.ndarray,
    query_tokens: np.ndarray,
    hits: list[dict[str, Any]],
    top_k: int,
    rerank_top_k: int,
) -> list[dict[str, Any]]:
    """One query's results: its search ``hits`` (embedding order) with the first ``rerank_top_k`` re-ranked, the
    rest in place; the first ``top_k`` returned. Only the candidates' embeddings and tokens are read from the index
    (:meth:`~.protocol.GalleryIndex.rerank_features`)."""
    head = hits[:rerank_top_k]
    if not head:
        return []
    embeddings, tokens = index.rerank_features([hit["id"] for hit in head])
    ranking = reranker.rank(RerankFeatures(query_embedding, query_tokens), RerankFeatures(embeddings, tokens))
    results = []
    for hit in ranking:
        base = head[hit["corpus_id"]]
        extra = {"cosine": hit["cosine"], "head_score": hit["head_score"], "reranked": True}
        results.append({**base, "score": float(hit["score"]), **extra})
    for base in hits[rerank_top_k:]:
        results.append({**base, "cosine": base["score"], "head_score": None, "reranked": False})
    return results[:top_k]


def search_and_rerank(
    index: Any,
    reranker: Any,
    query_embeddings: Any,
    query_tokens: Any,
    top_k: int,
    rerank_top_k: int,
    *,
    filter: Any = None,
    **search_params: Any,
) -> list[list[dict[str, Any]]]:
    """For each query (embeddings Q×D, tokens Q×T×C), the index's ``max(top_k, rerank_top_k)`` nearest (live, passing
    ``filter``) with the first ``rerank_top_k`` re-ranked (:func:`rerank_hits`), ``top_k`` returned.
    ``search_params``: the engine's search settings (``ef_search``, ``nprobe``; None values are left out)."""
    check_index_for_reranker(index, reranker)
    embeddings = np.asarray(query_embeddings, dtype=np.float32).reshape(-1, index.dim)
    tokens = np.asarray(query_tokens, dtype=np.float32)
    options = {name: value for name, value in search_params.items() if value is not None}
    if filter:
        options["filter"] = filter
    found = index.search(embeddings, max(top_k, rerank_top_k), **options)
    return [
        rerank_hits(reranker, index, embeddings[q], tokens[q], found[q], top_k, rerank_top_k)
        for q in range(len(embeddings))
    ]
