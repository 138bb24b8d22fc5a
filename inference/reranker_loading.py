"""Which re-ranker goes with a model argument: an export's ``reranker/``, a Hub repo's, or a training run's head.

Every re-rank option (``search --rerank_top_k``, ``evaluate --rerank_top_k``, the pipeline's ``rerank_top_k``) and
``index build`` (which stores the head's tokens when a re-ranker exists) ask here, so that a model without one is
refused with the same message, before any image is embedded:

* :func:`find_reranker` says where the re-ranker of an exported folder or Hub id is, or None (cheap);
* :func:`require_reranker` is the same, raising the clear refusal;
* :func:`load_reranker` loads it;
* :func:`training_reranker` gives a training run's or checkpoint's re-ranker with the embedder it belongs to.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning, CrossMetricModel
from ..modeling.reranking_crossmetric import RERANKER_FOLDER, CrossMetricReranker, CrossMetricRerankerConfig
from .loading import load_training_checkpoint, resolve_model
from .run_folder import BEST_FOLDER, BEST_HEAD_FILE, find_training_checkpoint

logger = logging.getLogger(__name__)

Location = tuple[str, str | None]  # (local folder or Hub id, subfolder)


def no_reranker_message(model: Any, option: str, flag: str = "--model") -> str:
    """The refusal of a re-rank option for a model without a re-ranker."""
    return (
        f"{option} needs a re-ranker, and {flag} {os.fspath(model)!r} has none (no {RERANKER_FOLDER}/ folder): it was "
        "trained with the head off (--cia_levels 0) or with --cia_query shuffled, or exported before re-rankers. "
        f"Train with the head (--cia_levels > 0) and export again, or drop {option}."
    )


def find_reranker(model: Any, flag: str = "--model") -> Location | None:
    """Where the re-ranker of ``model`` (an exported folder, a run folder with an export, or a Hub id) is, or None.

    Nothing is loaded; for a Hub id only ``reranker/config.json`` is asked for. A training checkpoint without an
    export has none here (see :func:`training_reranker`).
    """
    if isinstance(model, CrossMetricReranker):
        return None
    return resolved_reranker(*resolve_model(model, flag), flag=flag)


def resolved_reranker(kind: str, source: Path | str, *, flag: str = "--model") -> Location | None:
    """:func:`find_reranker` for a model already classified by ``resolve_model`` (``kind``, ``source``)."""
    if kind == "export":
        folder = Path(source) / RERANKER_FOLDER
        return (str(folder), None) if (folder / "config.json").is_file() else None
    if kind == "hub":
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            hf_hub_download(str(source), "config.json", subfolder=RERANKER_FOLDER)
        except EntryNotFoundError:
            return None
        except Exception as error:  # offline, no such repo, network: say what was asked
            raise ValueError(f"{flag} {source!r}: could not look for its re-ranker on the Hub: {error}") from error
        return str(source), RERANKER_FOLDER
    return None


def require_reranker(model: Any, option: str, flag: str = "--model") -> Location:
    """:func:`find_reranker`, raising ``ValueError`` (:func:`no_reranker_message`) when there is none."""
    location = find_reranker(model, flag)
    if location is None:
        raise ValueError(no_reranker_message(model, option, flag))
    return location


def load_reranker(location: Location, embedder: CrossMetricModel | None = None) -> CrossMetricReranker:
    """The re-ranker at ``location`` (from :func:`find_reranker`), in eval mode; ``embedder`` is its embedder when
    already loaded (else it is loaded from the export on the first image)."""
    path, subfolder = location
    options = {"subfolder": subfolder} if subfolder else {}
    return CrossMetricReranker.from_pretrained(path, embedder=embedder, **options)


def reranker_config(location: Location) -> CrossMetricRerankerConfig:
    """The configuration alone (token stage, fusion) of the re-ranker at ``location``."""
    path, subfolder = location
    return CrossMetricRerankerConfig.from_pretrained(path, **({"subfolder": subfolder} if subfolder else {}))


def training_reranker(source: str | os.PathLike) -> tuple[CrossMetricReranker, CrossMetricModel, str]:
    """``(re-ranker, its embedder, what it is)`` of a training run or checkpoint folder.

    A run folder gives the model it selected on validation (``RUN/best`` and the head saved with it) and, when the
    run chose its fusion there, ``RUN/reranker``; otherwise (a checkpoint, or a run without that choice) the head of
    the loaded model keeps the embedding's order (``reranks`` False), with the reason recorded.
    """
    from safetensors.torch import load_file

    folder = Path(source)
    checkpoint, _ = find_training_checkpoint(folder)
    model = load_training_checkpoint(checkpoint)
    _check_head(model, str(source))
    selected = checkpoint != folder and (folder / BEST_FOLDER / "model.safetensors").is_file()
    if selected:
        model.embedder.load_state_dict(load_file(folder / BEST_FOLDER / "model.safetensors"), strict=True)
        if (folder / BEST_HEAD_FILE).is_file():
            model.head.load_state_dict(load_file(folder / BEST_HEAD_FILE), strict=True)
        fitted = folder / RERANKER_FOLDER
        if (fitted / "config.json").is_file():
            reranker = CrossMetricReranker.from_pretrained(fitted, embedder=model.embedder)
            return reranker, model.embedder, f"{fitted} (with the embedder the run selected)"
        reason = "the run chose no fusion on a validation split: the head of the model it selected, unfused"
        what = f"the head of the model {source} selected (no {RERANKER_FOLDER}/)"
    else:
        reason = f"checkpoint {checkpoint.name}: no fusion chosen on a validation split"
        what = f"the head of {checkpoint}"
    reranker = model.to_reranker(alpha=0.0, reranks=False, validation={"reason": reason})
    return reranker.set_embedder(model.embedder), model.embedder, what


def _check_head(model: CrossMetricForMetricLearning, source: str) -> None:
    if model.head is None:
        raise ValueError(
            f"{source} was trained without the head (cia_levels=0): it has no re-ranker, so there is nothing to "
            "re-rank with; drop --rerank_top_k."
        )
    if model.head.query_mode == "shuffled":
        raise ValueError(f"{source} was trained with cia_query shuffled, whose similarity needs a random third image.")
