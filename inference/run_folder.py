"""What a training run folder holds, in one place: training writes these names, and export and loading read them.

::

    RUN/
      training_config.yaml      the run's TrainingConfig, as the recipe completed it
      log.jsonl                 one JSON record per logged step, evaluation ("eval") and report ("zero_shot", "final")
      summary.json              what ``crossmetric train`` printed, as JSON
      best/                     the embedder selected on the validation split (``save_embedder``)
      best-head.safetensors     the head saved with it (never exported with the embedder)
      reranker/                 that head as a re-ranker, its fusion chosen on validation (``training/reranker_fit.py``)
      model/                    the export: the selected embedder, its card, metrics and training config
      checkpoints/
        training_config.yaml
        checkpoint-STEP/        model.safetensors, optimizer, scheduler and RNG states, trainer_state.json, COMPLETE

A checkpoint counts only once its ``COMPLETE`` marker is written (``training/checkpointing.py`` writes it last).
:func:`model_config_from_fields` is how a training configuration describes the model: the trainer builds its model
with it (``TrainingConfig.model_config``) and :func:`training_model_config` rebuilds the same model from a run's
``training_config.yaml``, so that loading a checkpoint needs nothing of ``training/``.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..modeling.configuration_crossmetric import HEAD_FIELDS, CrossMetricConfig
from .pretrained import WEIGHT_SOURCES

TRAINING_CONFIG_FILE = "training_config.yaml"
LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
BEST_FOLDER = "best"
BEST_HEAD_FILE = "best-head.safetensors"  # the head at the selected step, beside RUN/best (never exported with it)
EXPORT_FOLDER = "model"
CHECKPOINTS_FOLDER = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_root(run_directory: Path) -> Path:
    return Path(run_directory) / CHECKPOINTS_FOLDER


def complete_checkpoints(run_directory: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_directory)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_NAME.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file() and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state a checkpoint was written with (step, epoch, best metrics, ...)."""
    return json.loads((Path(checkpoint) / TRAINER_STATE).read_text())


def find_run_folder(checkpoint: Path) -> Path | None:
    """The run folder of a checkpoint (or run) folder: the nearest folder at or above it with a ``log.jsonl``."""
    return next((f for f in (checkpoint, *checkpoint.parents) if (f / LOG_FILE).is_file()), None)


def read_log(run_directory: Path) -> list[dict[str, Any]]:
    """The records of a run's ``log.jsonl``, in order."""
    text = (Path(run_directory) / LOG_FILE).read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def find_training_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(checkpoint folder, training_config.yaml)`` of a checkpoint folder or of a run folder's latest checkpoint."""
    source = Path(path)
    if not source.is_dir():
        raise FileNotFoundError(f"checkpoint {str(source)!r}: no such folder (pass a training run or checkpoint).")
    if (source / TRAINER_STATE).is_file():
        checkpoint = source
    elif complete_checkpoints(source):
        checkpoint = complete_checkpoints(source)[-1]
    else:
        raise FileNotFoundError(
            f"checkpoint {str(source)!r} is neither a training checkpoint (no {TRAINER_STATE}) nor a run folder "
            f"with complete checkpoints under {CHECKPOINTS_FOLDER}/."
        )
    for folder in (checkpoint, *checkpoint.parents):
        if (folder / TRAINING_CONFIG_FILE).is_file():
            return checkpoint, folder / TRAINING_CONFIG_FILE
    raise FileNotFoundError(f"No {TRAINING_CONFIG_FILE} in {checkpoint} or above it: is it a crossmetric run?")


def _model_fields() -> frozenset[str]:
    parameters = inspect.signature(CrossMetricConfig.__init__).parameters.values()
    return frozenset(p.name for p in parameters if p.name != "self" and p.kind is not p.VAR_KEYWORD)


def model_config_from_fields(values: Mapping[str, Any]) -> CrossMetricConfig:
    """The :class:`CrossMetricConfig` a training configuration describes (validated there).

    Every training field named like an argument of ``CrossMetricConfig`` (backbone, image size, embedding, the
    ``cia_*`` head fields) is that argument; the normalisation is the one of the ``pretrained`` weights when they are
    a known source (:data:`~.pretrained.WEIGHT_SOURCES`), else the backbone's default.
    """
    source = WEIGHT_SOURCES.get(values.get("pretrained"))
    mean_std = source.normalisation if source is not None else {}
    fields = _model_fields()
    return CrossMetricConfig(**{name: value for name, value in values.items() if name in fields}, **mean_std)


def training_model_config(config_path: str | os.PathLike) -> CrossMetricConfig:
    """The model configuration of a run, from its ``training_config.yaml``.

    A run started from ``model_name_or_path`` keeps that model's architecture with the run's :data:`HEAD_FIELDS`; a
    run written before ``cia_token_stride`` existed read the last feature map (stride 0).
    """
    values = yaml.safe_load(Path(config_path).read_text(encoding="utf-8")) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{config_path}: expected a mapping of field: value, got {type(values).__name__}.")
    values.setdefault("cia_token_stride", 0)  # a run from before the field: its head read the last feature map
    model_config = model_config_from_fields(values)
    if values.get("model_name_or_path"):
        head = {name: getattr(model_config, name) for name in HEAD_FIELDS}
        model_config = CrossMetricConfig.from_pretrained(values["model_name_or_path"], **head)
    return model_config
