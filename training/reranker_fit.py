"""The re-ranker a run ships next to its embedder: the head of the selected model, its fusion chosen on validation.

After selection, the head (saved with the selected embedder, so the two match) scores each validation query's K
nearest neighbours; :func:`~crossmetric.evaluation.rerank_fusion.choose_fusion` picks ``alpha`` of
``head + alpha · cosine`` and whether re-ranking beats the embedding at all. The result is written to
``RUN/reranker`` (a :class:`CrossMetricReranker` folder, atomically), which export copies into ``reranker/``.
Never fitted on the test split: a run without a validation split gets no re-ranker, and says why.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..evaluation.rerank_fusion import candidate_scores, choose_fusion
from ..evaluation.reranking import head_inputs
from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning
from ..modeling.reranking_crossmetric import RERANKER_FOLDER
from ..utils.atomic_files import staged_directory
from .reranker_stage import train_head_stage

logger = logging.getLogger(__name__)


def reranker_unavailable_reason(model: CrossMetricForMetricLearning, selection_split: str | None) -> str | None:
    """Why this run gets no re-ranker, or None when it gets one."""
    if model.head is None:
        return "the head is off (cia_levels=0)"
    if model.head.query_mode == "shuffled":
        return "cia_query shuffled conditions on a random third image, which a query-time pair does not have"
    if selection_split != "validation":
        return f"no validation split to choose its fusion on (selection split: {selection_split})"
    return None


def fit_reranker(
    model: CrossMetricForMetricLearning,
    validation: Any,
    run_directory: Path,
    *,
    top_k: int,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
) -> dict[str, Any]:
    """Choose the fusion on ``validation`` (a dataset split), write ``run_directory/reranker``, return the choice."""
    embeddings, tokens, labels = head_inputs(model, validation, batch_size, device, progress)
    top_k = min(top_k, len(labels) - 1)
    scores = candidate_scores(model.head, embeddings, tokens, labels, top_k, device=device)
    choice = choose_fusion(scores)
    reranker = model.to_reranker(alpha=choice["alpha"], reranks=choice["reranks"], validation=choice["validation"])
    with staged_directory(run_directory / RERANKER_FOLDER) as staging:
        reranker.save_pretrained(staging, safe_serialization=True)
    validation_metrics = choice["validation"]
    logger.info(
        "re-ranker (top %d, validation): Recall@1 %.4f -> %.4f fused (alpha %g), %.4f head only%s",
        top_k, validation_metrics["recall@1"], validation_metrics["rerank/recall@1"], choice["alpha"],
        validation_metrics["rerank/recall@1_head_only"],
        "" if choice["reranks"] else "; no gain on validation: it keeps the embedding's order",
    )  # fmt: skip
    model.train()
    return choice


def fit_run_reranker(
    model: CrossMetricForMetricLearning,
    dataset: Any,
    selection_split: str | None,
    config: Any,
    accelerator: Any,
    batches: Any = None,
    objective: Any = None,
) -> dict[str, Any] | None:
    """:func:`fit_reranker` for a finished run (``config`` its :class:`TrainingConfig`), on the accelerator's main
    process (None on the others), after the second stage (:mod:`.reranker_stage`) when ``config.reranker_stage_steps``
    asks for one (on ``batches`` with the run's ``objective``); None, logged, when the run gets no re-ranker
    (:func:`reranker_unavailable_reason`, or ``reranker_top_k`` 0)."""
    if not accelerator.is_main_process:
        return None
    if model.head is not None and config.reranker_stage_steps:
        train_head_stage(
            model, batches, objective, steps=config.reranker_stage_steps, learning_rate=config.head_learning_rate,
            weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, device=accelerator.device,
            progress=config.progress,
        )  # fmt: skip
    reason = reranker_unavailable_reason(model, selection_split)
    if reason is None and not config.reranker_top_k:
        reason = "--reranker_top_k 0"
    if reason is not None:
        if model.head is not None:
            logger.info("no re-ranker: %s", reason)
        return None
    return fit_reranker(
        model, dataset["validation"], config.run_directory, top_k=config.reranker_top_k,
        batch_size=config.eval_batch_size, device=accelerator.device, progress=config.progress,
    )  # fmt: skip
