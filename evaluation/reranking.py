"""A direct probe of conditioning: re-rank each query's nearest neighbours by the head's conditional similarity.

Retrieval with the exported embedder never runs the head, so test metrics alone cannot say whether the head's
conditional similarity ``S^L[q, n]`` (docs/design.md §1) knows more than the unconditional one. This module asks it
directly: for every test query, take its ``K`` nearest neighbours by the embedding (leave-one-out, canonical tie
order, as the metrics count them), order them by ``S^L[q, n]`` of the last head level, and report Recall@1 before
and after. The pairs are evaluated as a list (:meth:`CrossImageAttentionHead.pair_similarities`: 2·K pair states
per query, not a whole batch's B²), chunk by chunk over the queries.

Used by ``crossmetric evaluate --rerank_top_k K`` on a training run or checkpoint (the head is never exported).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from ..data.dml_dataset import label_array
from ..inference.embedding import EvalTransform, embed_images, embeddings_and_head_tokens
from ..inference.loading import load_training_checkpoint
from ..inference.run_folder import find_training_checkpoint
from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning
from .reports import nearest_neighbours


def add_rerank_argument(parser: argparse.ArgumentParser) -> None:
    """``--rerank_top_k K`` of ``crossmetric evaluate``."""
    parser.add_argument(
        "--rerank_top_k",
        type=int,
        default=None,
        help="re-rank each query's K nearest neighbours by the head's last-level conditional similarity and report "
        "Recall@1 before and after (needs --checkpoint, or --model naming a training run or checkpoint)",
    )


def rerank_source(ns: argparse.Namespace) -> str | None:
    """The run or checkpoint whose head re-ranks (``--checkpoint``, else ``--model``); ``ValueError`` if none.

    Called while the evaluate command checks its arguments, before anything is embedded or written.
    """
    if ns.rerank_top_k is None:
        return None
    if ns.rerank_top_k < 2:
        raise ValueError(f"--rerank_top_k must be >= 2 (a re-ranking needs candidates), got {ns.rerank_top_k}.")
    source = ns.checkpoint or ns.model
    try:
        find_training_checkpoint(source)
    except FileNotFoundError as error:
        raise ValueError(
            f"--rerank_top_k needs the cross-image-attention head, which only training checkpoints hold: pass "
            f"--checkpoint RUN_OR_CHECKPOINT, or --model naming a training run or checkpoint ({error})"
        ) from error
    return str(source)


def load_reranker(source: str) -> CrossMetricForMetricLearning:
    """The training model of ``source``, checked to have a head whose pair similarities are defined."""
    model = load_training_checkpoint(source)
    if model.head is None:
        raise ValueError(f"{source} was trained without the head (cia_levels=0): there is nothing to re-rank with.")
    if model.head.query_mode == "shuffled":
        raise ValueError(f"{source} was trained with cia_query shuffled, whose similarity needs a random third image.")
    return model


def head_inputs(
    model: CrossMetricForMetricLearning, split: Any, batch_size: int, device: torch.device, progress: bool
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Embeddings (N×D), head tokens (N×T×C') and labels of a split, from one backbone pass per batch."""
    result = embed_images(
        model, EvalTransform(model.config.preprocessing), split, batch_size, device, progress,
        desc="head inputs", forward=embeddings_and_head_tokens, skip_unreadable=False,
    )  # fmt: skip
    labels = np.asarray(label_array(split), dtype=np.int64)
    return torch.from_numpy(result.embeddings), torch.from_numpy(result.extras["tokens"]), labels


@torch.no_grad()
def rerank_recall_at_1(
    model: CrossMetricForMetricLearning,
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    labels: np.ndarray,
    top_k: int,
    *,
    num_gallery: int | None = None,
    device: torch.device | str = "cpu",
    queries_per_chunk: int = 128,
) -> dict[str, float]:
    """Recall@1 of the embedding and of its top-``top_k`` re-ranked by ``S^L[q, n]``, and the ceiling Recall@K.

    Leave-one-out over all rows by default; with ``num_gallery`` the last ``num_gallery`` rows are the gallery and
    the others the queries (In-Shop). Ties in ``S^L`` keep the embedding's order.
    """
    head = model.head.eval().to(device)
    split = len(embeddings) - (num_gallery or 0)
    query_ids = np.arange(split if num_gallery else len(embeddings))
    gallery_offset = split if num_gallery else 0
    gallery = embeddings[gallery_offset:].numpy()
    self_ids = None if num_gallery else query_ids
    neighbours, _ = nearest_neighbours(embeddings[query_ids].numpy(), gallery, top_k, self_ids=self_ids)
    neighbours = neighbours + gallery_offset
    reranked = np.empty(len(query_ids), dtype=np.int64)
    for start in range(0, len(query_ids), queries_per_chunk):
        chunk = neighbours[start : start + queries_per_chunk]
        first = np.repeat(query_ids[start : start + queries_per_chunk], chunk.shape[1])
        images, inverse = np.unique(np.concatenate([first, chunk.ravel()]), return_inverse=True)
        index = torch.from_numpy(inverse).to(device)
        last = head.pair_similarities(
            embeddings[images].to(device), tokens[images].to(device), index[: len(first)], index[len(first) :]
        )[-1]
        best = last.view(chunk.shape).argmax(dim=1).cpu().numpy()  # the first of equal maxima: embedding order
        reranked[start : start + len(chunk)] = chunk[np.arange(len(chunk)), best]
    query_labels = labels[query_ids]
    return {
        "rerank_top_k": float(neighbours.shape[1]),
        "recall@1_before_rerank": float(np.mean(labels[neighbours[:, 0]] == query_labels)),
        "recall@1_reranked": float(np.mean(labels[reranked] == query_labels)),
        "recall@k_rerank_ceiling": float(np.mean((labels[neighbours] == query_labels[:, None]).any(axis=1))),
    }


def rerank_metrics(
    source: str, queries: Any, gallery: Any | None, ns: argparse.Namespace, device: torch.device
) -> dict[str, float]:
    """What ``crossmetric evaluate --rerank_top_k`` adds to metrics.json, for the evaluated split(s)."""
    model = load_reranker(source)
    parts = [queries] if gallery is None else [queries, gallery]
    inputs = [head_inputs(model, part, ns.batch_size, device, ns.progress) for part in parts]
    embeddings = torch.cat([part[0] for part in inputs])
    tokens = torch.cat([part[1] for part in inputs])
    labels = np.concatenate([part[2] for part in inputs])
    num_gallery = len(inputs[1][2]) if gallery is not None else None
    return rerank_recall_at_1(
        model, embeddings, tokens, labels, ns.rerank_top_k, num_gallery=num_gallery, device=device
    )
