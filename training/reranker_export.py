"""The re-ranker an export ships next to its embedder, in ``reranker/``, and what the model card says about it.

A model trained with the head (``cia_levels`` > 0, query ``other`` or ``self``) exports it as a
:class:`~crossmetric.modeling.reranking_crossmetric.CrossMetricReranker`:

- a run that chose its fusion on the validation split has ``RUN/reranker`` (``training/reranker_fit.py``), built
  from the head saved with the selected embedder: the export copies it, byte for byte;
- otherwise (a checkpoint exported on its own, a run without a validation split or with ``--reranker_top_k 0``)
  the export's own head becomes a re-ranker that keeps the embedding's order (``reranks`` False), with the reason
  in its config, its log and the card: no re-ranker is shipped as helping where that was not measured.

The folder is written into the export's staging folder, so the embedder and its re-ranker appear together or not
at all. The exported embedder itself is unchanged (no head keys).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning, CrossMetricModel
from ..modeling.reranking_crossmetric import (
    RERANKER_FOLDER,
    CrossMetricReranker,
    embed_with_tokens,
    fallback_message,
)

TOKEN_BYTES = 2  # an index stores the head's tokens in float16


def export_reranker(
    model: Any, run_folder: Path | None, *, selected: bool, checkpoint: Path | None = None
) -> tuple[CrossMetricReranker, Path | None] | None:
    """``(re-ranker, folder to copy or None)`` of an exported training model, or None when it has no usable head.

    ``selected``: the exported embedder is the one the run selected, whose ``RUN/reranker`` matches it.
    ``checkpoint``: the checkpoint exported instead, named in the reason of a re-ranker that keeps the embedding's
    order.
    """
    if not isinstance(model, CrossMetricForMetricLearning) or model.head is None:
        return None
    if model.head.query_mode == "shuffled":
        return None
    fitted = run_folder / RERANKER_FOLDER if run_folder is not None and selected else None
    if fitted is not None and (fitted / "config.json").is_file():
        return CrossMetricReranker.from_pretrained(fitted), fitted
    if checkpoint is not None:
        reason = f"exported from checkpoint {checkpoint.name}, for which no fusion was chosen on a validation split"
    else:
        reason = "the run chose no fusion on a validation split (no validation split, or --reranker_top_k 0)"
    return model.to_reranker(alpha=0.0, reranks=False, validation={"reason": reason}), None


def reranker_writer(reranker: CrossMetricReranker, fitted: Path | None) -> Callable[[Path], None]:
    """What writes ``reranker/`` into an export's staging folder: a copy of ``fitted``, else ``save_pretrained``."""

    def write(staging: Path) -> None:
        if fitted is not None:
            shutil.copytree(fitted, staging / RERANKER_FOLDER)
        else:
            reranker.save_pretrained(staging / RERANKER_FOLDER, safe_serialization=True)

    return write


@torch.no_grad()
def token_shape(embedder: CrossMetricModel, token_stage: str | None) -> tuple[int, int, tuple[int, int] | None]:
    """``(T, C, grid)`` of the head's tokens at the embedder's input size (one forward pass of a blank image)."""
    size = int(embedder.config.image_size)
    device = next(embedder.parameters()).device
    was_training = embedder.training
    embedder.eval()
    try:
        _, _, tokens, grid = embed_with_tokens(embedder, torch.zeros(1, 3, size, size, device=device), token_stage)
    finally:
        embedder.train(was_training)
    return int(tokens.shape[1]), int(tokens.shape[2]), grid


def reranker_card(reranker: CrossMetricReranker, embedder: CrossMetricModel) -> dict[str, Any]:
    """The model card's "Re-ranker" figures: the fusion, the validation figures, the stored bytes per gallery item."""
    config = reranker.config
    count, channels, grid = token_shape(embedder, config.token_stage)
    validation = dict(config.validation or {})
    return {
        "reranks": bool(config.reranks),
        "alpha": float(config.alpha),
        "fallback": None if config.reranks else fallback_message(config),
        "validation": validation if "recall@1" in validation else None,
        "top_k": validation.get("rerank_top_k"),
        "levels": int(config.cia_levels),
        "token_stage": config.token_stage or "the embedder's last feature map",
        "tokens": count,
        "token_grid": f"{grid[0]}×{grid[1]}" if grid else f"{count} tokens",
        "token_dim": channels,
        "bytes_per_item": count * channels * TOKEN_BYTES,
        "embedding_bytes": int(embedder.config.embedding_dim) * 4,
    }
