"""``crossmetric export``: the embedding-only model of a run or checkpoint, with its card (and ``onnx/`` if asked).

The folder is the one a run writes at its end (``TrainingResult.export()``): the same card, sentence-transformers files
and metrics (:mod:`crossmetric.model_cards.run_card`), with the run's log and state read back from its folder
(:mod:`crossmetric.inference.run_folder`) instead of taken from the trainer. A model trained with the head also gets
its re-ranker in ``reranker/`` (:mod:`crossmetric.training.reranker_export`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from safetensors.torch import load_file

from ..inference.loading import load_training_checkpoint
from ..inference.run_folder import (
    BEST_FOLDER,
    BEST_HEAD_FILE,
    find_run_folder,
    find_training_checkpoint,
    read_log,
    read_state,
)
from ..model_cards.model_card import write_model_card
from ..model_cards.run_card import card_data_for_run, export_files
from ..modeling.modeling_crossmetric import save_embedder
from ..training.config import TrainingConfig
from ..training.reranker_export import export_reranker, reranker_card, reranker_writer

logger = logging.getLogger(__name__)


def export_checkpoint(
    run_or_checkpoint: str | os.PathLike, output_dir: str | os.PathLike, onnx: bool = False, onnx_recall: str = "auto"
) -> Path:
    """Export the embedder of a training run (the model it selected) or of one checkpoint folder (that step's).

    A run folder exports the embedder the run selected on its validation split (``RUN/best``, the one its own
    export holds), not its latest checkpoint, which may be worse; a run without a selection exports its latest
    checkpoint. The model is rebuilt and loaded strictly by
    :func:`~crossmetric.inference.loading.load_training_checkpoint` (the same loading as ``crossmetric evaluate
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
    run_folder = find_run_folder(checkpoint)
    history = read_log(run_folder) if run_folder is not None else []
    state = read_state(checkpoint)
    evals = [
        {**r["eval"], "step": r["step"]} for r in history if "eval" in r and r.get("step", 0) <= state["global_step"]
    ]
    metrics = evals[-1] if evals else None
    selected = Path(run_or_checkpoint) / BEST_FOLDER / "model.safetensors"
    is_selected = checkpoint != Path(run_or_checkpoint) and selected.is_file()  # a run folder that selected a model
    if is_selected:
        model.embedder.load_state_dict(load_file(selected), strict=True)
        best_head = Path(run_or_checkpoint) / BEST_HEAD_FILE  # the head saved with the selected embedder
        if model.head is not None and best_head.is_file():
            model.head.load_state_dict(load_file(best_head), strict=True)
        metrics = state.get("best_metrics") or metrics
        logger.info("exporting the model the run selected, not its latest checkpoint: %s", metrics)
    data = card_data_for_run(config, model.config, history, metrics)
    run = Path(run_or_checkpoint) if is_selected else None
    reranker = export_reranker(model, run, selected=is_selected, checkpoint=None if is_selected else checkpoint)
    if reranker is not None:
        data.reranker = reranker_card(reranker[0], model.embedder)
    write = reranker_writer(*reranker) if reranker is not None else None
    directory = save_embedder(model.embedder, output_dir, extra_files=export_files(data, metrics), write_extra=write)
    if onnx:
        from .onnx_export import export_onnx_for_run

        data.onnx = export_onnx_for_run(model.embedder, directory, config, onnx_recall)
        write_model_card(data, directory)
    return directory
