"""One answer to "which model does this argument name?": an exported folder, a training run, a checkpoint, a Hub id.

Every command (``evaluate``, ``index build``, ``search``, ``export``) and the Python API
(``EmbeddingIndex.from_folder``, ``embed_gallery``) resolve a model argument here, so that the same value means
the same model everywhere and a mistake gets the same message (naming the flag, the value and what to pass
instead):

* :func:`resolve_model` classifies a value without loading anything (cheap; commands call it before any work);
* :func:`load_embedder` returns the embedder and its image processor;
* :func:`load_training_checkpoint` returns the full training model (embedder + head) of a run or checkpoint.

A Hub id is recognised with ``huggingface_hub``'s ``validate_repo_id`` and a required namespace
(:func:`~crossmetric.hub.push.check_repo_id`, the rule ``crossmetric push`` applies too).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from ..modeling.configuration_crossmetric import HEAD_FIELDS
from ..modeling.image_processing_crossmetric import build_image_processor
from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning, CrossMetricModel
from ..training.checkpointing import complete_checkpoints
from ..training.config import TrainingConfig
from .push import check_repo_id

ModelKind = Literal["export", "checkpoint", "hub"]
_WHAT_TO_PASS = "pass an exported model folder (crossmetric export), a training run folder, a checkpoint, or a Hub id"


def is_hub_id(value: str) -> bool:
    """Whether ``value`` is a valid Hub model id of the form ``namespace/name``."""
    try:
        check_repo_id(value)
    except ValueError:
        return False
    return True


def resolve_model(value: str | os.PathLike, flag: str = "--model") -> tuple[ModelKind, Path | str]:
    """Classify a model argument as ``("export", folder)``, ``("checkpoint", run_or_checkpoint)`` or ``("hub", id)``.

    A training run folder resolves to its ``model/`` export when it has one, else to its latest complete
    checkpoint. Nothing is loaded; a value that names nothing raises ``ValueError`` mentioning ``flag``.
    """
    text = os.fspath(value)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return "export", path
        if (path / "model" / "config.json").is_file():
            return "export", path / "model"
        if (path / "trainer_state.json").is_file() or complete_checkpoints(path):
            return "checkpoint", path
        raise ValueError(f"{flag} {text!r} has no config.json, no model/ export and no checkpoints/: {_WHAT_TO_PASS}.")
    if path.exists():
        raise ValueError(f"{flag} {text!r} is a file; {_WHAT_TO_PASS}.")
    if not is_hub_id(text):
        raise ValueError(f"{flag} {text!r}: no such folder, and not a Hub id of the form user/name; {_WHAT_TO_PASS}.")
    return "hub", text


def find_training_checkpoint(path: str | os.PathLike) -> tuple[Path, Path]:
    """``(checkpoint folder, training_config.yaml)`` of a checkpoint folder or of a run folder's latest checkpoint."""
    source = Path(path)
    if not source.is_dir():
        raise FileNotFoundError(f"checkpoint {str(source)!r}: no such folder (pass a training run or checkpoint).")
    if (source / "trainer_state.json").is_file():
        checkpoint = source
    elif complete_checkpoints(source):
        checkpoint = complete_checkpoints(source)[-1]
    else:
        raise FileNotFoundError(
            f"checkpoint {str(source)!r} is neither a training checkpoint (no trainer_state.json) nor a run folder "
            "with complete checkpoints under checkpoints/."
        )
    for folder in (checkpoint, *checkpoint.parents):
        if (folder / "training_config.yaml").is_file():
            return checkpoint, folder / "training_config.yaml"
    raise FileNotFoundError(f"No training_config.yaml in {checkpoint} or above it: is it a crossmetric run?")


def load_training_checkpoint(path: str | os.PathLike) -> CrossMetricForMetricLearning:
    """The full training model (embedder + head) of a checkpoint folder, or of a run folder's latest checkpoint.

    The model is rebuilt from the run's ``training_config.yaml`` (a run started from ``model_name_or_path`` keeps
    that model's architecture with the run's :data:`HEAD_FIELDS`) and filled from the checkpoint's
    ``model.safetensors`` strictly: a missing, unexpected or misshapen weight is a ``ValueError``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    checkpoint, config_path = find_training_checkpoint(path)
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{checkpoint} has no model.safetensors; is it a crossmetric training checkpoint?")
    config = TrainingConfig.from_yaml(config_path)
    if "cia_token_stride" not in config_path.read_text(encoding="utf-8"):
        config.cia_token_stride = 0  # a run from before the field: its head read the last feature map
    model_config = config.model_config()
    if config.model_name_or_path:
        from ..modeling.configuration_crossmetric import CrossMetricConfig

        head = {name: getattr(model_config, name) for name in HEAD_FIELDS}
        model_config = CrossMetricConfig.from_pretrained(config.model_name_or_path, **head)
    model = CrossMetricForMetricLearning(model_config)
    try:
        missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    except SafetensorError as error:
        raise ValueError(f"{weights} cannot be read ({error}): the checkpoint is truncated or damaged.") from error
    except RuntimeError as error:  # tensor shapes differ: another model or configuration
        raise ValueError(
            f"{weights} does not match the model described by {config_path}: {str(error)[:600]}"
        ) from error
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match the model described by {config_path}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    return model.eval()


def load_embedder(
    model: str | os.PathLike | torch.nn.Module,
    image_processor: Any | None = None,
    *,
    flag: str = "--model",
    backend: str = "torch",
) -> tuple[CrossMetricModel, Any]:
    """Return ``(embedder, image_processor)`` for a model argument (see :func:`resolve_model`) or a model object.

    An exported folder or Hub id is loaded with ``CrossMetricModel.from_pretrained`` (safetensors only) and its
    saved ``preprocessor_config.json``; a run or checkpoint gives the embedder of its training model; a
    :class:`CrossMetricForMetricLearning` gives its embedder. Without a saved processor (checkpoints, model
    objects) the evaluation preprocessing is built from the model's config. Loaded models are in eval mode.
    ``backend="onnx"`` runs an exported folder's ``onnx/model.onnx`` with ONNX Runtime instead (no PyTorch model is
    loaded; see :mod:`crossmetric.evaluation.onnx_embedding`).
    """
    if backend != "torch":
        from ..evaluation.onnx_embedding import check_backend, load_onnx_embedder

        check_backend(backend)
        return load_onnx_embedder(model, image_processor)
    if isinstance(model, (str, os.PathLike)):
        kind, source = resolve_model(model, flag)
        if kind == "checkpoint":
            embedder = load_training_checkpoint(source).embedder.eval()
            return embedder, image_processor or build_image_processor(embedder.config)
        from transformers import AutoImageProcessor

        try:
            embedder = CrossMetricModel.from_pretrained(str(source)).eval()
            if image_processor is None:
                image_processor = AutoImageProcessor.from_pretrained(str(source))
        except OSError as error:
            where = "the Hub (it is not a local folder)" if kind == "hub" else str(source)
            raise ValueError(
                f"{flag} {os.fspath(model)!r}: could not load a crossmetric model from {where}: {error}"
            ) from error
        return embedder, image_processor
    if isinstance(model, CrossMetricForMetricLearning):
        model = model.embedder
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an exported model folder, a Hub id or a torch module, got {type(model)}.")
    if image_processor is None:
        if not hasattr(model, "config") or not hasattr(model.config, "image_size"):
            raise ValueError("model has no CrossMetricConfig to build preprocessing from: pass image_processor=.")
        image_processor = build_image_processor(model.config)
    return model, image_processor
