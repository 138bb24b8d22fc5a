"""The trivial baselines every ``crossmetric evaluate`` report shows next to the model, so that a reader sees at once
whether training helped: raw pixels (:func:`~.evaluator.raw_pixel_features`) and the zero-shot backbone (the
untrained pretrained backbone the model started from, its pooled features L2-normalised).

The zero-shot row needs the pretrained weight source, read from the model's ``training_config.yaml`` (exports and
runs written by ``crossmetric train`` have it). A row that cannot be computed (no training config, ``pretrained:
none``, weights unavailable offline) is skipped with a one-line reason for the report; it never fails the command.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..inference.loading import resolve_model
from ..inference.run_folder import TRAINING_CONFIG_FILE, find_training_checkpoint
from ..modeling.modeling_crossmetric import CrossMetricModel
from .evaluator import embed_split, raw_pixel_features

logger = logging.getLogger(__name__)

BASELINES = ("raw_pixels", "zero_shot")  # the values of --baselines
ROW_NAMES = {"raw_pixels": "raw pixels", "zero_shot": "zero-shot"}  # their rows in tables and curves
Features = Callable[[Any], tuple[np.ndarray, np.ndarray]]


def _training_config_file(model: str) -> Path | None:
    """The ``training_config.yaml`` of a model argument (export, run, checkpoint or Hub id), or None."""
    kind, where = resolve_model(model)
    if kind == "export":
        return Path(where) / TRAINING_CONFIG_FILE
    if kind == "checkpoint":
        return find_training_checkpoint(where)[1]
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(str(where), TRAINING_CONFIG_FILE))
    except Exception:  # offline, or a repository without it: the caller says "unknown"
        return None


def pretrained_source(model: str) -> tuple[str | None, str]:
    """``(source, "")`` of the pretrained backbone ``model`` was trained from, or ``(None, why not)``."""
    path = _training_config_file(model)
    if path is None or not path.is_file():
        return None, "no training_config.yaml next to the model, so its pretrained weights are unknown"
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        return None, f"{path} cannot be read ({type(error).__name__})"
    if values.get("model_name_or_path"):
        start = values["model_name_or_path"]
        return None, f"trained from the model {start!r}, not a backbone; compare with --baseline_model {start}"
    source = values.get("pretrained")
    if not source or source == "none":
        return None, f"trained with pretrained={source or 'none'!r} (random start): there is no pretrained backbone"
    return str(source), ""


def zero_shot_features(
    embedder: CrossMetricModel, source: str, *, batch_size: int, device: torch.device, progress: bool
) -> Features:
    """Features of the untrained backbone of ``embedder``'s architecture with the ``source`` weights: pooled (before
    the embedding layer, which training created) and L2-normalised. Raises when the weights cannot be loaded."""
    from ..inference.pretrained import load_pretrained_backbone

    fresh = CrossMetricModel(copy.deepcopy(embedder.config))
    load_pretrained_backbone(fresh, source)
    fresh.to(device).eval()

    def features(split: Any) -> tuple[np.ndarray, np.ndarray]:
        pooled, labels = embed_split(fresh, split, batch_size=batch_size, device=device, progress=progress, pooled=True)
        return torch.nn.functional.normalize(torch.from_numpy(pooled), dim=-1).numpy(), labels

    return features


def baseline_features(
    names: Any, model: str, embedder: CrossMetricModel, *, batch_size: int, device: torch.device, progress: bool
) -> tuple[dict[str, Features], dict[str, str]]:
    """The embedding functions of the requested baselines (row name -> function) and the skipped ones (row name ->
    reason, one line)."""
    rows: dict[str, Features] = {}
    skipped: dict[str, str] = {}
    if "raw_pixels" in names:
        rows[ROW_NAMES["raw_pixels"]] = raw_pixel_features
    if "zero_shot" in names:
        source, why = pretrained_source(model)
        if source is not None:
            try:
                rows[ROW_NAMES["zero_shot"]] = zero_shot_features(
                    embedder, source, batch_size=batch_size, device=device, progress=progress
                )
            except (
                Exception
            ) as error:  # unavailable offline, missing package, wrong architecture: a note, not a failure
                message = str(error).splitlines()[0] if str(error) else type(error).__name__
                why = f"pretrained={source!r} could not be loaded: {message[:200]}"
        if why:
            skipped[ROW_NAMES["zero_shot"]] = why
            logger.warning("zero-shot baseline skipped: %s", why)
    return rows, skipped
