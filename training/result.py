"""What a finished training run reports, and its export (the caller decides whether to export)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..inference.run_folder import EXPORT_FOLDER
from ..model_cards.run_card import card_data_for_run, export_files
from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning, save_embedder
from .config import TrainingConfig
from .reranker_export import export_reranker, reranker_card, reranker_writer


def export_run(
    run_directory: str | os.PathLike,
    model: torch.nn.Module,
    config: TrainingConfig,
    metrics: dict[str, float] | None,
    history: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write ``run_directory/model``: weights without the head, config, preprocessing, model card, metrics and
    training config; with the head, its re-ranker in ``reranker/`` (:mod:`.reranker_export`), in the same staging.

    Takes plain values (not the trainer), so that export does not depend on the trainer's internals: ``model`` is
    the training model (possibly wrapped by accelerate/DDP/``torch.compile``) or its embedder, ``config`` the
    run's :class:`TrainingConfig`, ``history`` the run's log records (for the card's training table).
    """
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    embedder = model.embedder if isinstance(model, CrossMetricForMetricLearning) else model
    data = card_data_for_run(config, embedder.config, list(history), metrics)
    reranker = export_reranker(model, Path(run_directory), selected=True)  # RUN/reranker, or the head unfused
    if reranker is not None:
        data.reranker = reranker_card(reranker[0], embedder)
    files = export_files(data, metrics, training_config=config)
    write = reranker_writer(*reranker) if reranker is not None else None
    return save_embedder(embedder, Path(run_directory) / EXPORT_FOLDER, extra_files=files, write_extra=write)


@dataclass
class TrainingResult:
    """What a finished run reports."""

    run_directory: Path
    global_step: int
    metrics: dict[str, float]  # test metrics of the selected (exported) model
    best_metrics: dict[str, float] | None  # its metrics on the selection split, with its "step"
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    export_directory: Path | None = None
    median_step_seconds: float | None = None
    zero_shot: dict[str, float] | None = None  # test metrics of the starting model
    selection_split: str | None = None  # "validation", "test" (best-on-test) or None (last model)
    validation_curve: list[dict[str, Any]] = field(default_factory=list)  # {"step", metrics} of every candidate
    recipe: list[str] = field(default_factory=list)  # what the recipe chose and why
    model: CrossMetricForMetricLearning | None = None  # the training model, with the selected weights
    config: TrainingConfig | None = None  # the run's configuration, as the recipe completed it
    reranker: dict[str, Any] | None = None  # the re-ranker's fusion chosen on validation (RUN/reranker), if any

    def export(self) -> Path:
        """Write ``RUN/model``: the selected embedder (no head weights), its card, metrics and training config."""
        self.export_directory = export_run(self.run_directory, self.model, self.config, self.metrics, self.history)
        return self.export_directory
