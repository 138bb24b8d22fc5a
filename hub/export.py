"""Export: the embedding-only model of a run, with its preprocessing, metrics and a model card filled from the run."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from ..model_cards.model_card import CrossMetricModelCardData, render_model_card, write_model_card
from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning, save_embedder
from ..training.checkpointing import read_state
from ..training.config import TrainingConfig
from ..training.model_selection import BEST_FOLDER
from ..training.pretrained import WEIGHT_SOURCES
from .model_loading import find_training_checkpoint, load_training_checkpoint
from .sentence_transformers_files import sentence_transformers_files

logger = logging.getLogger(__name__)


def card_data_for_run(
    config: TrainingConfig, model_config: Any, history: list[dict[str, Any]], metrics: dict[str, float] | None
) -> CrossMetricModelCardData:
    """Model-card data of a run: architecture, non-default hyperparameters, training log, metrics."""
    source = WEIGHT_SOURCES.get(config.pretrained)  # the weights' record: equivalent Hub model, license
    base_model = source.base_model if source is not None else None
    if base_model is None and config.pretrained == "timm":
        base_model = f"timm/{config.backbone}"
    data = CrossMetricModelCardData.from_config(
        model_config,
        base_model=base_model,
        datasets=[str(config.dataset)] if not os.path.isabs(str(config.dataset)) else [],
        license=source.license if source is not None else "apache-2.0",
        hyperparameters=config.non_default_values(),
    )
    last_loss = None
    for record in history:
        if "loss" in record:
            last_loss = record["loss"]
        if "eval" in record:
            data.add_log(
                epoch=record["epoch"],
                step=record["step"],
                loss=last_loss,
                **{k: record["eval"][k] for k in ("recall@1", "map@r") if k in record["eval"]},
            )
    name = Path(str(config.dataset)).name
    for record in history:
        if "zero_shot" in record:  # the floor: the starting model, before any training
            data.add_evaluation(record["zero_shot"], dataset_name=name, dataset_type=name, split="test, zero-shot")
    if metrics:
        data.add_evaluation(metrics, dataset_name=name, dataset_type=name, split="test")
    data.model_selection = _selection_text(config, history)
    return data


def _selection_text(config: TrainingConfig, history: Sequence[dict[str, Any]]) -> str:
    """How the run chose the exported model, for the card (the literature's best-on-test is labelled as such)."""
    candidates = [r for r in history if "eval" in r]
    if config.eval_split == "test":
        return (
            f"the best of {len(candidates)} candidates on the test split itself (the literature's best-on-test "
            "protocol, which overestimates the test metrics; see Musgrave et al. 2020)."
        )
    if not candidates:
        return "none; the model at the end of training (no validation split could be carved from the train classes)."
    return (
        f"the best of {len(candidates)} candidates (the starting model and one per evaluation) on a validation split "
        f"of {config.validation_fraction:.0%} of the training classes, never on the test split; the test split was "
        "embedded once, for the exported model."
    )


def export_run(
    run_directory: str | os.PathLike,
    model: torch.nn.Module,
    config: TrainingConfig,
    metrics: dict[str, float] | None,
    history: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write ``run_directory/model``: weights without the head, config, preprocessing, model card, metrics and
    training config.

    Takes plain values (not the trainer), so that export does not depend on the trainer's internals: ``model`` is
    the training model (possibly wrapped by accelerate/DDP/``torch.compile``) or its embedder, ``config`` the
    run's :class:`TrainingConfig`, ``history`` the run's log records (for the card's training table).
    """
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(model)
    embedder = model.embedder if isinstance(model, CrossMetricForMetricLearning) else model
    data = card_data_for_run(config, embedder.config, list(history), metrics)
    extra = {
        "README.md": str(render_model_card(data)),
        "training_config.yaml": yaml.safe_dump(config.to_dict(), sort_keys=False),
        **sentence_transformers_files(),
    }
    if metrics:
        extra["metrics.json"] = json.dumps(metrics, indent=2)
    return save_embedder(embedder, Path(run_directory) / "model", extra_files=extra)


def export_checkpoint(
    run_or_checkpoint: str | os.PathLike, output_dir: str | os.PathLike, onnx: bool = False, onnx_recall: str = "auto"
) -> Path:
    """Export the embedder of a training run (the model it selected) or of one checkpoint folder (that step's).

    A run folder exports the embedder the run selected on its validation split (``RUN/best``, the one its own
    export holds), not its latest checkpoint, which may be worse; a run without a selection exports its latest
    checkpoint. The model is rebuilt and loaded strictly by
    :func:`~crossmetric.hub.model_loading.load_training_checkpoint` (the same loading as ``crossmetric evaluate
    --checkpoint``, with the run's head fields); the card's training table and metrics come from the run's
    ``log.jsonl``. ``onnx`` also writes and checks ``onnx/`` (see :func:`.onnx_export.export_onnx_for_run`), and the
    card says so.
    """
    if onnx:
        from .onnx_export import require_onnx

        require_onnx()
    checkpoint, config_path = find_training_checkpoint(run_or_checkpoint)
    model = load_training_checkpoint(checkpoint)
    config = TrainingConfig.from_yaml(config_path)
    run_folder = next((f for f in (checkpoint, *checkpoint.parents) if (f / "log.jsonl").is_file()), None)
    history = []
    if run_folder is not None:
        history = [json.loads(line) for line in (run_folder / "log.jsonl").read_text().splitlines() if line.strip()]
    state = read_state(checkpoint)
    evals = [
        {**r["eval"], "step": r["step"]} for r in history if "eval" in r and r.get("step", 0) <= state["global_step"]
    ]
    metrics = evals[-1] if evals else None
    selected = Path(run_or_checkpoint) / BEST_FOLDER / "model.safetensors"
    if checkpoint != Path(run_or_checkpoint) and selected.is_file():  # a run folder that selected a model
        model.embedder.load_state_dict(load_file(selected), strict=True)
        metrics = state.get("best_metrics") or metrics
        logger.info("exporting the model the run selected, not its latest checkpoint: %s", metrics)
    data = card_data_for_run(config, model.config, history, metrics)
    extra = {"README.md": str(render_model_card(data)), **sentence_transformers_files()}
    if metrics:
        extra["metrics.json"] = json.dumps(metrics, indent=2)
    directory = save_embedder(model.embedder, output_dir, extra_files=extra)
    if onnx:
        from .onnx_export import export_onnx_for_run

        data.onnx = export_onnx_for_run(model.embedder, directory, config, onnx_recall)
        write_model_card(data, directory)
    return directory
