"""What ``crossmetric evaluate --rerank_top_k K`` reports: each query's K nearest re-scored, base → re-ranked.

As sentence-transformers' ``CrossEncoderRerankingEvaluator``: the candidates are the embedding's own K nearest
(leave-one-out, canonical tie order, as the metrics count them); a positive the retrieval missed is never brought
in, so ``rerank/recall@k_ceiling`` (a positive among the K) bounds every re-ranked figure. The keys written next to
the plain metrics:

- ``rerank/recall@1_base``: Recall@1 of the candidates' own order (the embedding: equal to ``recall@1`` when the
  re-ranker belongs to the evaluated embedder);
- ``rerank/recall@1``: re-ranked by the fused score ``head + alpha · cosine`` (the cosine alone, i.e. the base,
  when the re-ranker keeps the embedding's order: ``rerank/reranks`` 0);
- ``rerank/recall@1_head_only``: re-ranked by the head's similarity alone;
- ``rerank/recall@1_training_free``: re-ranked by DIML's parameter-free structural similarity on the same tokens
  (:mod:`.structural_similarity`): what the learned head adds over the tokens themselves;
- ``rerank/recall@k_ceiling``, ``rerank/alpha``, ``rerank/reranks``, ``rerank_top_k``;
- ``rerank/ms_per_query``: the head's time over a query's K candidates with their tokens at hand (no backbone pass,
  no search), measured here over chunks of queries; one query at a time: ``scripts/benchmark_rerank.py``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from .rerank_fusion import CandidateScores, candidate_cosines, candidate_neighbours, head_scores
from .structural_similarity import structural_scores


def recall_at_1_of(scores: CandidateScores, order_scores: np.ndarray) -> float:
    """Recall@1 after ordering each query's candidates by ``order_scores`` (Q×K; ties keep the embedding's order)."""
    best = np.argmax(order_scores, axis=1)
    top = scores.neighbours[np.arange(len(best)), best]
    return float(np.mean(scores.labels[top] == scores.labels[scores.query_ids]))


@torch.no_grad()
def rerank_metrics(
    reranker: Any,
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    labels: np.ndarray,
    top_k: int,
    *,
    num_gallery: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """The ``rerank/`` metrics of a :class:`CrossMetricReranker` on embedded rows (embeddings N×D, its tokens N×T×C,
    labels N); leave-one-out, or the last ``num_gallery`` rows as the gallery."""
    top_k = min(top_k, num_gallery if num_gallery else len(labels) - 1)
    query_ids, neighbours = candidate_neighbours(embeddings, top_k, num_gallery)
    head_scores(reranker.head, embeddings, tokens, query_ids[:1], neighbours[:1], device)  # warm-up, not timed
    start = time.perf_counter()
    head = head_scores(reranker.head, embeddings, tokens, query_ids, neighbours, device)
    seconds = time.perf_counter() - start
    scores = CandidateScores(query_ids, neighbours, head, candidate_cosines(embeddings, query_ids, neighbours), labels)
    config = reranker.config
    training_free = structural_scores(embeddings, tokens, query_ids, neighbours)
    return {
        "rerank_top_k": float(top_k),
        "rerank/recall@1_base": scores.recall_at_1(None),
        "rerank/recall@1": scores.recall_at_1(config.alpha if config.reranks else None),
        "rerank/recall@1_head_only": scores.recall_at_1(0.0),
        "rerank/recall@1_training_free": recall_at_1_of(scores, training_free),
        "rerank/recall@k_ceiling": scores.ceiling(),
        "rerank/alpha": float(config.alpha),
        "rerank/reranks": float(bool(config.reranks)),
        "rerank/ms_per_query": 1000.0 * seconds / max(1, len(query_ids)),
    }


def rerank_summary(metrics: dict[str, float], what: str | None = None) -> list[str]:
    """The printed "base → re-ranked" block of ``crossmetric evaluate`` (also a line of ``report.md``)."""
    k = int(metrics["rerank_top_k"])
    fusion = (
        f"head + {metrics['rerank/alpha']:g} · cosine, chosen on validation"
        if metrics["rerank/reranks"]
        else "off: keeps the embedding's order (not shown to help on validation)"
    )
    lines = [f"re-ranking each query's {k} nearest{f' with {what}' if what else ''} (fused score: {fusion})"]
    base, fused = metrics["rerank/recall@1_base"], metrics["rerank/recall@1"]
    rows = [
        ("Recall@1 base → re-ranked (fused)", f"{base:.4f} → {fused:.4f}"),
        ("re-ranked, head only", f"{metrics['rerank/recall@1_head_only']:.4f}"),
        ("re-ranked, training-free (DIML)", f"{metrics['rerank/recall@1_training_free']:.4f}"),
        (f"ceiling: a positive among the {k}", f"{metrics['rerank/recall@k_ceiling']:.4f}"),
        ("head cost per query", f"{metrics['rerank/ms_per_query']:.2f} ms"),
    ]  # fmt: skip
    return lines + [f"  {name:<36} {value}" for name, value in rows]


def rerank_report_line(metrics: dict[str, float]) -> str:
    """One line for ``report.md``'s details."""
    return (
        f"Recall@1 {metrics['rerank/recall@1_base']:.4f} → {metrics['rerank/recall@1']:.4f} re-ranked (fused"
        f"{'' if metrics['rerank/reranks'] else ', off: the embedding order'}); head only "
        f"{metrics['rerank/recall@1_head_only']:.4f}; training-free {metrics['rerank/recall@1_training_free']:.4f}; "
        f"ceiling {metrics['rerank/recall@k_ceiling']:.4f}; {metrics['rerank/ms_per_query']:.2f} ms per query"
    )
