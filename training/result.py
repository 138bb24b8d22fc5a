"""What a finished training run reports, and its export (the caller decides whether to export)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning
from .config import TrainingConfig


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

    def export(self) -> Path:
        """Write ``RUN/model``: the selected embedder (no head weights), its card, metrics and training config."""
        from ..hub.export import export_run

        self.export_directory = export_run(self.run_directory, self.model, self.config, self.metrics, self.history)
        return self.export_directory
