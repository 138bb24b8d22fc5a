"""What an export of a training run writes next to the embedder's weights: the card filled from the run, the
sentence-transformers files, the metrics and the training configuration.

Both exports use it: the end of a run (``TrainingResult.export()``, ``training/result.py``) and ``crossmetric export``
of a run folder or checkpoint afterwards (``hub/export.py``), so that they write the same folder. The training
configuration is taken as a plain ``TrainingConfig`` object (its fields and ``non_default_values()``), never
imported: this layer sits below ``training/``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..inference.pretrained import WEIGHT_SOURCES
from ..inference.run_folder import TRAINING_CONFIG_FILE
from .model_card import CrossMetricModelCardData, render_model_card
from .sentence_transformers_files import sentence_transformers_files

METRICS_FILE = "metrics.json"


def card_data_for_run(
    config: Any, model_config: Any, history: list[dict[str, Any]], metrics: dict[str, float] | None
) -> CrossMetricModelCardData:
    """Model-card data of a run (``config``: its ``TrainingConfig``): architecture, non-default hyperparameters,
    training log, metrics."""
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
        transfer=_transfer(config),
        transfer_stopped=_transfer_stopped(history),
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


def _selection_text(config: Any, history: Sequence[dict[str, Any]]) -> str:
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


def export_files(
    data: CrossMetricModelCardData, metrics: dict[str, float] | None, training_config: Any = None
) -> dict[str, str]:
    """File name -> text of what an export writes beside the weights (``save_embedder(extra_files=...)``): the card
    (``README.md``), the sentence-transformers files, ``metrics.json`` when there are metrics, and the run's
    ``training_config.yaml`` when ``training_config`` (a ``TrainingConfig``) is given."""
    files = {"README.md": str(render_model_card(data))}
    if training_config is not None:
        files[TRAINING_CONFIG_FILE] = yaml.safe_dump(training_config.to_dict(), sort_keys=False)
    files.update(sentence_transformers_files())
    if metrics:
        files[METRICS_FILE] = json.dumps(metrics, indent=2)
    return files


def _transfer_stopped(history: Sequence[dict[str, Any]]) -> str | None:
    """Where the transfer stopped and why, in words, when its stop rule fired (``training/transfer_gate.py`` logs a
    ``transfer_check`` record at each check, with its ``reason`` when it stops)."""
    record = next((r for r in history if r.get("transfer_check", {}).get("stopped")), None)
    if record is None:
        return None
    check = record["transfer_check"]
    reason = check.get("reason") or (
        f"the head re-ranked the validation split no better than the embedding (Recall@1 over each query's "
        f"{check['candidates']} nearest: head alone {check['head_recall@1']:.4f}, embedding "
        f"{check['embedding_recall@1']:.4f})"
    )
    return f"The transfer stopped at step {record['step']} (its weight was 0 from then on): {reason}."


def _transfer(config: Any) -> str | None:
    """The head-to-embedding transfer of a run, in words (None when it had none)."""
    weight = getattr(config, "cia_distill_weight", 0.0)
    if not weight or not getattr(config, "cia_levels", 0):
        return None
    form = config.cia_distill_form
    detail = f"top {config.cia_distill_top_k}, " if form == "listwise" else ""
    if form != "margin_mse":
        detail += f"temperature {config.cia_distill_temperature:g}, "
    return f"{form} distillation ({detail}weight {weight:g}, warm-up {config.cia_distill_warmup_steps} steps)"
