"""Which model a run exports: the best candidate on a split carved from the training classes, never on the test split.

"A Metric Learning Reality Check" (Musgrave, Belongie, Lim, ECCV 2020) showed that picking the epoch on the test
split inflates DML results across the field. Here the candidates are the starting model (step 0, so the export is
never worse than where training started, on validation) and the model at every evaluation; the best one on the
validation split is kept in ``RUN/best`` and restored at the end, and only then is the test split embedded, once.
``eval_split="test"`` reproduces the literature's best-on-test protocol and is labelled so.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import load_file, save_file

from ..data.dml_dataset import carve_validation, label_array
from ..inference.run_folder import BEST_FOLDER, BEST_HEAD_FILE

logger = logging.getLogger(__name__)

MIN_VALIDATION_CLASSES = 2


def add_validation_split(dataset: Any, config: Any) -> tuple[Any, str | None, str]:
    """The dataset with a ``validation`` split carved from its train classes when ``config.eval_split`` asks for one,
    the split that selects the model (``None``: no selection, the last model is exported) and a line for the log."""
    split = config.eval_split
    if split == "test":
        return dataset, "test", "selection on the test split (the literature's best-on-test protocol, optimistic)"
    if split != "validation" or "validation" in dataset:
        if split not in dataset:
            raise ValueError(f"--eval_split {split!r} is not a split of the dataset (it has {list(dataset)}).")
        return dataset, split, f"selection on the {split!r} split"
    classes = len(np.unique(label_array(dataset["train"])))
    held_out = round(config.validation_fraction * classes)
    if held_out < MIN_VALIDATION_CLASSES or classes - held_out < 2:
        reason = f"{classes} train classes x validation_fraction={config.validation_fraction}"
        return dataset, None, f"no validation split ({reason}): no selection, the last model is exported"
    dataset = carve_validation(dataset, config.validation_fraction, config.split_strategy, config.seed)
    line = (
        f"selection on a validation split of {held_out} of the {classes} train classes "
        f"({len(dataset['validation'])} images; --validation_fraction {config.validation_fraction})"
    )
    return dataset, "validation", line


class ModelSelection:
    """Keeps the best candidate's embedder in ``RUN/best`` by ``metric`` (higher is better)."""

    def __init__(self, run_directory: Path, metric: str) -> None:
        self.directory = run_directory / BEST_FOLDER
        self.metric = metric
        self.best: dict[str, Any] | None = None

    def consider(self, step: int, metrics: dict[str, float], model: Any) -> bool:
        """Save ``model``'s embedder as the best if it beats the best so far; MAP@R breaks ties of the selection metric
        (Recall@1 saturates on easy validation splits), and a full tie keeps the earlier model."""
        if self.metric not in metrics:
            raise ValueError(f"--selection_metric {self.metric!r} is not a metric; choose one of {sorted(metrics)}.")
        if self.best is not None and _key(metrics, self.metric) <= _key(self.best, self.metric):
            return False
        self.best = {**metrics, "step": step}
        model.save_embedder(self.directory)
        if getattr(model, "head", None) is not None:  # the re-ranker must match the embedder it re-ranks for
            head_file = self.directory.parent / BEST_HEAD_FILE
            partial = head_file.with_name(f".{head_file.name}.partial")
            save_file({k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}, partial)
            os.replace(partial, head_file)
        return True

    def restore(self, model: Any) -> None:
        """Load the best embedder's weights into ``model.embedder`` (the exported model is the selected one), and the
        head saved with it into ``model.head``."""
        model.embedder.load_state_dict(load_file(self.directory / "model.safetensors"), strict=True)
        head_file = self.directory.parent / BEST_HEAD_FILE
        if getattr(model, "head", None) is not None and head_file.is_file():
            model.head.load_state_dict(load_file(head_file), strict=True)
        if self.best is not None:  # known on the main process, which evaluated the candidates
            logger.info(
                "restored the model of step %s (%s %.4f)", self.best["step"], self.metric, self.best[self.metric]
            )


def _key(metrics: dict[str, Any], metric: str) -> tuple[float, float]:
    return metrics[metric], metrics.get("map@r", 0.0)
