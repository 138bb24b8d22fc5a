"""Retrieve, then re-rank: score each query's K nearest neighbours by the head, and choose how to fuse the scores.

The head's last-level similarity ``S^L[q, c]`` is computed once per (query, candidate) pair; the fused score
``S^L + alpha · cosine`` is then cheap for every ``alpha``. :func:`choose_fusion` picks ``alpha`` on the validation
split at training time (never on the test split) and says whether re-ranking helps there at all: a re-ranker that
has not been shown to help falls back to the embedding's order. Candidates are the embedding's K nearest
(leave-one-out, canonical tie order, as the metrics count them); items past K keep the embedding's order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .reports import nearest_neighbours

ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)  # the cosine's weight; head similarities are concentrated


@dataclass
class CandidateScores:
    """The K candidates of each query and their scores: ``neighbours`` (Q×K row ids, embedding order), ``head`` and
    ``cosine`` (Q×K), ``query_ids`` (Q) and ``labels`` (of all rows)."""

    query_ids: np.ndarray
    neighbours: np.ndarray
    head: np.ndarray
    cosine: np.ndarray
    labels: np.ndarray

    def recall_at_1(self, alpha: float | None) -> float:
        """Recall@1 after re-ranking by ``head + alpha · cosine`` (None: the embedding's own order); ties keep the
        embedding's order."""
        if alpha is None:
            best = np.zeros(len(self.query_ids), dtype=np.int64)
        else:
            best = np.argmax(self.head + alpha * self.cosine, axis=1)  # the first of equal maxima
        top = self.neighbours[np.arange(len(best)), best]
        return float(np.mean(self.labels[top] == self.labels[self.query_ids]))

    def ceiling(self) -> float:
        """Recall@K of the candidates: the most any re-ranking of them can reach."""
        return float(np.mean((self.labels[self.neighbours] == self.labels[self.query_ids][:, None]).any(axis=1)))


@torch.no_grad()
def candidate_scores(
    head: torch.nn.Module,
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    labels: np.ndarray,
    top_k: int,
    *,
    num_gallery: int | None = None,
    device: torch.device | str = "cpu",
    queries_per_chunk: int = 128,
) -> CandidateScores:
    """Each query's ``top_k`` nearest neighbours by the embedding, with the head's and the embedding's score.

    ``head`` is a :class:`CrossImageAttentionHead`. Leave-one-out over all rows by default; with ``num_gallery`` the
    last ``num_gallery`` rows are the gallery and the others the queries (In-Shop). The pairs are evaluated as a list
    (2·K pair states per query, not a batch's B²), chunk by chunk.
    """
    query_ids, neighbours = candidate_neighbours(embeddings, top_k, num_gallery)
    scores = head_scores(head, embeddings, tokens, query_ids, neighbours, device, queries_per_chunk)
    return CandidateScores(query_ids, neighbours, scores, candidate_cosines(embeddings, query_ids, neighbours), labels)


def candidate_cosines(embeddings: torch.Tensor, query_ids: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Q×K embedding cosines of each query and its candidates (float32)."""
    normalized = torch.nn.functional.normalize(embeddings.float(), dim=1).numpy()
    return np.einsum("qd,qkd->qk", normalized[query_ids], normalized[neighbours]).astype(np.float32)


def candidate_neighbours(
    embeddings: torch.Tensor, top_k: int, num_gallery: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(query row ids, Q×K candidate row ids)``: each query's ``top_k`` nearest by the embedding (leave-one-out, or
    against the last ``num_gallery`` rows), in the metrics' canonical tie order."""
    split = len(embeddings) - (num_gallery or 0)
    query_ids = np.arange(split if num_gallery else len(embeddings))
    gallery_offset = split if num_gallery else 0
    self_ids = None if num_gallery else query_ids
    neighbours, _ = nearest_neighbours(
        embeddings[query_ids].numpy(), embeddings[gallery_offset:].numpy(), top_k, self_ids=self_ids
    )
    return query_ids, neighbours + gallery_offset


@torch.no_grad()
def head_scores(
    head: torch.nn.Module,
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    query_ids: np.ndarray,
    neighbours: np.ndarray,
    device: torch.device | str = "cpu",
    queries_per_chunk: int = 128,
) -> np.ndarray:
    """Q×K last-level head similarities ``S^L[q, c]`` of each query and its candidates, ``queries_per_chunk`` queries
    at a time (each image's keys and values computed once per chunk)."""
    head = head.eval().to(device)
    scores = np.empty(neighbours.shape, dtype=np.float32)
    for start in range(0, len(query_ids), queries_per_chunk):
        chunk = neighbours[start : start + queries_per_chunk]
        first = np.repeat(query_ids[start : start + queries_per_chunk], chunk.shape[1])
        images, inverse = np.unique(np.concatenate([first, chunk.ravel()]), return_inverse=True)
        index = torch.from_numpy(inverse).to(device)
        last = head.pair_similarities(
            embeddings[images].to(device).float(), tokens[images].to(device).float(), index[: len(first)],
            index[len(first) :],
        )[-1]  # fmt: skip
        scores[start : start + len(chunk)] = last.view(chunk.shape).float().cpu().numpy()
    return scores


def choose_fusion(scores: CandidateScores, alphas: tuple[float, ...] = ALPHAS) -> dict:
    """The ``alpha`` with the best re-ranked Recall@1 on these (validation) scores, and whether it beats the embedding.

    Returns ``{"alpha", "reranks", "validation"}``; ``reranks`` is False when no fused score beats the embedding's
    own Recall@1, and the re-ranker then keeps the embedding's order. Ties between alphas keep the smallest.
    """
    embedding = scores.recall_at_1(None)
    fused = {alpha: scores.recall_at_1(alpha) for alpha in alphas}
    alpha = max(alphas, key=lambda a: (fused[a], -a))
    return {
        "alpha": float(alpha),
        "reranks": fused[alpha] > embedding,
        "validation": {
            "recall@1": embedding,
            "rerank/recall@1": fused[alpha],
            "rerank/recall@1_head_only": fused[0.0] if 0.0 in fused else scores.recall_at_1(0.0),
            "rerank/recall@k_ceiling": scores.ceiling(),
            "rerank_top_k": int(scores.neighbours.shape[1]),
            "queries": int(len(scores.query_ids)),
            "alphas": {str(a): r for a, r in fused.items()},
        },
    }
