"""``crossmetric evaluate --rerank_top_k K``: re-rank each query's K nearest with the model's re-ranker.

Which re-ranker, decided while the command checks its arguments (before anything is embedded or written):

- ``--model`` an exported folder or a Hub id: its ``reranker/`` (``CrossMetricReranker``), with the exported embedder
  the command evaluates; a model without one (head off) is refused, with the reason;
- ``--model`` (or ``--checkpoint``) a training run or checkpoint: the run's ``RUN/reranker`` with the embedder it
  selected on validation, else the head of that model, unfused (``reranks`` recorded as 0): see
  :func:`~crossmetric.inference.reranker_loading.training_reranker`.

The split is embedded once with the re-ranker's embedder: one backbone pass per batch gives the embeddings and the
head's tokens (:func:`reranker_inputs`); when that embedder is the evaluated one, the same embeddings give the plain
metrics too. The figures are :func:`~.rerank_metrics.rerank_metrics`'s.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.dml_dataset import label_array
from ..inference.embedding import (
    EvalTransform,
    embed_images,
    embeddings_and_head_tokens,
    embeddings_and_reranker_tokens,
)
from ..inference.loading import resolve_model
from ..inference.reranker_loading import find_reranker, load_reranker, no_reranker_message, training_reranker
from ..inference.run_folder import complete_checkpoints, find_training_checkpoint, training_model_config
from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning
from .rerank_metrics import rerank_metrics

OPTION = "--rerank_top_k"


def add_rerank_argument(parser: argparse.ArgumentParser) -> None:
    """``--rerank_top_k K`` of ``crossmetric evaluate``."""
    parser.add_argument(
        OPTION,
        type=int,
        default=None,
        help="re-rank each query's K nearest neighbours with the model's re-ranker and report Recall@1 base -> "
        "re-ranked (fused, head only, a training-free control) and the cost per query; needs a model trained with the "
        "head (an export with reranker/, a Hub id, or a training run or checkpoint)",
    )


@dataclass
class RerankSource:
    """Where the re-ranker comes from: an export's or Hub repo's ``reranker/`` (``location``), or a training run or
    checkpoint folder (``training``)."""

    location: tuple[str, str | None] | None = None
    training: str | None = None


def rerank_source(ns: argparse.Namespace) -> RerankSource | None:
    """Check ``--rerank_top_k`` and find its re-ranker (nothing loaded but configs); ``ValueError`` naming the fix."""
    if ns.rerank_top_k is None:
        return None
    if ns.rerank_top_k < 2:
        raise ValueError(f"{OPTION} must be >= 2 (a re-ranking needs candidates), got {ns.rerank_top_k}.")
    source, flag = (ns.checkpoint, "--checkpoint") if ns.checkpoint else (ns.model, "--model")
    kind, resolved = resolve_model(source, flag)
    if kind != "checkpoint":
        location = find_reranker(source, flag)
        if location is not None:
            return RerankSource(location=location)
        if not (Path(source).is_dir() and complete_checkpoints(Path(source))):  # not a run folder holding the head
            raise ValueError(no_reranker_message(source, OPTION, flag))
        resolved = Path(source)  # a run whose export has no reranker/: its own RUN/reranker or head
    try:
        _, config_path = find_training_checkpoint(resolved)
    except FileNotFoundError as error:
        raise ValueError(f"{OPTION}: {error}") from error
    config = training_model_config(config_path)
    if not config.cia_levels or config.cia_query == "shuffled":
        why = "the head off (cia_levels=0)" if not config.cia_levels else "cia_query shuffled"
        raise ValueError(
            f"{OPTION} needs a re-ranker, and {source!r} was trained with {why}, so it has none: train with the head "
            f"(--cia_levels > 0, --cia_query other or self), or drop {OPTION}."
        )
    return RerankSource(training=str(resolved))


def load_rerank_source(source: RerankSource, embedder: Any) -> tuple[Any, Any, str]:
    """``(re-ranker, its embedder, what it is)``; an export's re-ranker uses ``embedder`` (the evaluated one)."""
    if source.location is not None:
        reranker = load_reranker(source.location, embedder=embedder)
        return reranker, embedder, f"{source.location[0]}{'/' + source.location[1] if source.location[1] else ''}"
    return training_reranker(source.training)


def reranker_inputs(
    embedder: Any, token_stage: str | None, split: Any, batch_size: int, device: torch.device, progress: bool
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Embeddings (N×D), the re-ranker's tokens (N×T×C) and labels of a split, from one backbone pass per batch of
    the embedder, through the one embedding loop as the metrics' embedding (``embed_split``) runs it."""
    result = embed_images(
        embedder, EvalTransform(embedder.config.preprocessing), split, batch_size, device, progress,
        desc="embeddings and head tokens", forward=embeddings_and_reranker_tokens(token_stage), skip_unreadable=False,
        channels_last=True,
    )  # fmt: skip
    labels = np.asarray(label_array(split), dtype=np.int64)
    return torch.from_numpy(result.embeddings), torch.from_numpy(result.extras["tokens"]), labels


def head_inputs(
    model: CrossMetricForMetricLearning, split: Any, batch_size: int, device: torch.device, progress: bool
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Embeddings (N×D), head tokens (N×T×C') and labels of a split, for a training model's own head."""
    result = embed_images(
        model, EvalTransform(model.config.preprocessing), split, batch_size, device, progress,
        desc="head inputs", forward=embeddings_and_head_tokens, skip_unreadable=False,
    )  # fmt: skip
    labels = np.asarray(label_array(split), dtype=np.int64)
    return torch.from_numpy(result.embeddings), torch.from_numpy(result.extras["tokens"]), labels


@dataclass
class RerankEvaluation:
    """What :func:`evaluate_reranking` gives: the ``rerank/`` metrics, the re-ranker's description, and the embedded
    rows ``[(embeddings, labels)]`` per split when its embedder is the evaluated one (reused for the plain metrics)."""

    metrics: dict[str, float]
    what: str
    embedded: list[tuple[np.ndarray, np.ndarray]] | None


def evaluate_reranking(
    source: RerankSource, evaluator: Any, embedder: Any, ns: argparse.Namespace, device: torch.device
) -> RerankEvaluation:
    """Embed the evaluated split(s) with the re-ranker's embedder (one pass, tokens included) and compute the
    ``rerank/`` metrics of its top ``--rerank_top_k``."""
    reranker, rerank_embedder, what = load_rerank_source(source, embedder)
    reranker.to(device)
    stage = reranker.config.token_stage
    parts = [reranker_inputs(rerank_embedder, stage, s, ns.batch_size, device, ns.progress) for s in evaluator.splits]
    embeddings = torch.cat([part[0] for part in parts])
    tokens = torch.cat([part[1] for part in parts])
    labels = np.concatenate([part[2] for part in parts])
    num_gallery = len(parts[1][2]) if len(parts) == 2 else None
    metrics = rerank_metrics(
        reranker, embeddings, tokens, labels, ns.rerank_top_k, num_gallery=num_gallery, device=device
    )  # fmt: skip
    embedded = [(part[0].numpy(), part[2]) for part in parts] if rerank_embedder is embedder else None
    return RerankEvaluation(metrics, what, embedded)
