"""Export: the embedding-only model of a run, with its preprocessing, metrics and a model card filled from the run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..model_cards.model_card import CrossMetricModelCardData, render_model_card, write_model_card
from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning, save_embedder
from ..training.checkpointing import resolve_checkpoint
from ..training.config import TrainingConfig
from ..training.pretrained import WEIGHT_SOURCES
from .sentence_transformers_files import sentence_transformers_files


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
    if metrics:
        name = Path(str(config.dataset)).name
        data.add_evaluation(metrics, dataset_name=name, dataset_type=name, split=config.eval_split)
    return data


def export_run(trainer: Any, metrics: dict[str, float]) -> Path:
    """Write ``RUN/model``: weights without the head, config, preprocessing, model card, metrics, training config."""
    embedder = trainer.accelerator.unwrap_model(trainer.model).embedder
    data = card_data_for_run(trainer.config, embedder.config, trainer.history, metrics)
    return save_embedder(
        embedder,
        trainer.run_directory / "model",
        extra_files={
            "README.md": str(render_model_card(data)),
            "metrics.json": json.dumps(metrics, indent=2),
            "training_config.yaml": yaml.safe_dump(trainer.config.to_dict(), sort_keys=False),
            **sentence_transformers_files(),
        },
    )


def export_checkpoint(
    run_or_checkpoint: str | os.PathLike, output_dir: str | os.PathLike, onnx: bool = False, onnx_recall: str = "auto"
) -> Path:
    """Export the embedder of a training checkpoint (a run folder's latest, or one checkpoint folder).

    The model is rebuilt from the run's ``training_config.yaml`` and filled from the checkpoint's safetensors.
    ``onnx`` also writes and checks ``onnx/`` (see :func:`.onnx_export.export_onnx_for_run`), and the card says so.
    """
    if onnx:
        from .onnx_export import require_onnx

        require_onnx()
    source = Path(run_or_checkpoint)
    checkpoint = source if (source / "trainer_state.json").exists() else resolve_checkpoint(source, "latest")
    config_path = _find_upwards(checkpoint, "training_config.yaml")
    config = TrainingConfig.from_yaml(config_path)
    model = CrossMetricForMetricLearning(config.model_config())
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{checkpoint} has no model.safetensors; is it a crossmetric training checkpoint?")
    try:
        missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    except SafetensorError as error:
        raise ValueError(f"{weights} cannot be read ({error}): the checkpoint is truncated or damaged.") from error
    except RuntimeError as error:  # tensor shapes differ: another model or configuration
        raise ValueError(f"{weights} does not match the model of {config_path}: {str(error)[:600]}") from error
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match the model of {config_path}: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    history = []
    log = config_path.parent / "log.jsonl"
    if log.exists():
        history = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    evals = [r["eval"] for r in history if "eval" in r]
    data = card_data_for_run(config, model.config, history, evals[-1] if evals else None)
    extra = {"README.md": str(render_model_card(data)), **sentence_transformers_files()}
    if evals:
        extra["metrics.json"] = json.dumps(evals[-1], indent=2)
    directory = save_embedder(model.embedder, output_dir, extra_files=extra)
    if onnx:
        from .onnx_export import export_onnx_for_run

        data.onnx = export_onnx_for_run(model.embedder, directory, config, onnx_recall)
        write_model_card(data, directory)
    return directory


def _find_upwards(start: Path, name: str) -> Path:
    for folder in (start, *start.parents):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"No {name} in {start} or its parents: export needs the run's configuration.")
