"""One answer to "which model does this argument name?": an exported folder, a training run, a checkpoint, a Hub id.

Every command (``evaluate``, ``index build``, ``search``, ``export``) and the Python API
(``EmbeddingIndex.from_folder``, ``embed_gallery``) resolve a model argument here, so that the same value means
the same model everywhere and a mistake gets the same message (naming the flag, the value and what to pass
instead):

* :func:`resolve_model` classifies a value without loading anything (cheap; commands call it before any work);
* :func:`load_embedder` returns the embedder and its image processor;
* :func:`load_training_checkpoint` returns the full training model (embedder + head) of a run or checkpoint.

A Hub id is recognised with ``huggingface_hub``'s ``validate_repo_id`` and a required namespace
(:func:`check_repo_id`, the rule ``crossmetric push`` applies too). What a run folder holds is read through
:mod:`.run_folder`; ``backend="onnx"`` loads through :mod:`.onnx_runtime`.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..modeling.image_processing_crossmetric import build_image_processor
from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning, CrossMetricModel
from .run_folder import (
    EXPORT_FOLDER,
    TRAINER_STATE,
    complete_checkpoints,
    find_training_checkpoint,
    training_model_config,
)

ModelKind = Literal["export", "checkpoint", "hub"]
_WHAT_TO_PASS = "pass an exported model folder (crossmetric export), a training run folder, a checkpoint, or a Hub id"


def check_repo_id(repo_id: object) -> str:
    """Return ``repo_id`` if it is ``namespace/name`` and safe to put in a URL, else raise ValueError.

    On top of ``huggingface_hub.utils.validate_repo_id`` (characters, length, ``--``/``..``), the
    namespace is required (an implicit one would depend on whose token is set) and NUL bytes,
    absolute paths and ``..`` are named explicitly, since a repo id ends up in URL paths.
    """
    hint = "Use the form NAMESPACE/NAME, e.g. --repo-id my-user/crossmetric-cub200."
    if not isinstance(repo_id, str) or not repo_id:
        raise ValueError(f"repo_id must be a non-empty string, got {repo_id!r}. {hint}")
    if "\x00" in repo_id:
        raise ValueError(f"repo_id {repo_id!r} contains a NUL byte. {hint}")
    if repo_id.startswith(("/", "\\")) or PurePosixPath(repo_id).is_absolute() or ":" in repo_id:
        raise ValueError(f"repo_id {repo_id!r} looks like a path, not a Hub repo id. {hint}")
    if ".." in repo_id:
        raise ValueError(f"repo_id {repo_id!r} contains '..'. {hint}")
    namespace, _, name = repo_id.partition("/")
    if not namespace or not name or "/" in name:
        raise ValueError(f"repo_id {repo_id!r} must have exactly one '/' between namespace and name. {hint}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"repo_id {repo_id!r} is not a valid Hub repo id: {err} {hint}") from err
    return repo_id


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
        if (path / EXPORT_FOLDER / "config.json").is_file():
            return "export", path / EXPORT_FOLDER
        if (path / TRAINER_STATE).is_file() or complete_checkpoints(path):
            return "checkpoint", path
        raise ValueError(f"{flag} {text!r} has no config.json, no model/ export and no checkpoints/: {_WHAT_TO_PASS}.")
    if path.exists():
        raise ValueError(f"{flag} {text!r} is a file; {_WHAT_TO_PASS}.")
    if not is_hub_id(text):
        raise ValueError(f"{flag} {text!r}: no such folder, and not a Hub id of the form user/name; {_WHAT_TO_PASS}.")
    return "hub", text


def load_training_checkpoint(path: str | os.PathLike) -> CrossMetricForMetricLearning:
    """The full training model (embedder + head) of a checkpoint folder, or of a run folder's latest checkpoint.

    The model is rebuilt from the run's ``training_config.yaml`` (:func:`~.run_folder.training_model_config`: a run
    started from ``model_name_or_path`` keeps that model's architecture with the run's head fields) and filled from
    the checkpoint's ``model.safetensors`` strictly: a missing, unexpected or misshapen weight is a ``ValueError``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    checkpoint, config_path = find_training_checkpoint(path)
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{checkpoint} has no model.safetensors; is it a crossmetric training checkpoint?")
    model = CrossMetricForMetricLearning(training_model_config(config_path))
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
    loaded; see :mod:`.onnx_runtime`).
    """
    if backend != "torch":
        from .onnx_runtime import check_backend, load_onnx_embedder

        check_backend(backend)
        return load_onnx_embedder(model, image_processor)
    if isinstance(model, (str, os.PathLike)):
        return load_resolved_embedder(*resolve_model(model, flag), image_processor, flag=flag, given=model)
    if isinstance(model, CrossMetricForMetricLearning):
        model = model.embedder
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an exported model folder, a Hub id or a torch module, got {type(model)}.")
    if image_processor is None:
        if not hasattr(model, "config") or not hasattr(model.config, "image_size"):
            raise ValueError("model has no CrossMetricConfig to build preprocessing from: pass image_processor=.")
        image_processor = build_image_processor(model.config)
    return model, image_processor


def load_resolved_embedder(
    kind: ModelKind,
    source: Path | str,
    image_processor: Any | None = None,
    *,
    flag: str = "--model",
    given: str | os.PathLike | None = None,
) -> tuple[CrossMetricModel, Any]:
    """:func:`load_embedder` for a model already classified by :func:`resolve_model` (``kind``, ``source``), so that a
    caller that resolved it once (``inference.loaded_model.LoadedModel``) does not resolve it again; ``given``: the
    argument as the user wrote it, for messages."""
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
        named = os.fspath(given) if given is not None else str(source)
        raise ValueError(f"{flag} {named!r}: could not load a crossmetric model from {where}: {error}") from error
    return embedder, image_processor
