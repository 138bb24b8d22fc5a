"""``crossmetric search``: query images embedded by the one embedding loop (PyTorch or ONNX Runtime), searched in a
saved index; with ``rerank_top_k``, the K nearest re-ranked by the model's re-ranker (:mod:`.reranking`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from ..inference.embedding import embed_images, embeddings_and_reranker_tokens, model_reference, pooler_output
from ..inference.loading import load_embedder
from ..inference.reranker_loading import load_reranker, require_reranker
from .hub import DEFAULT_SUBFOLDER
from .index import EmbeddingIndex
from .reranking import check_index_for_reranker, search_and_rerank

logger = logging.getLogger(__name__)


def search_images(
    model: str | os.PathLike,
    index: str | os.PathLike | None,
    images: list[str],
    top_k: int = 5,
    *,
    backend: str = "torch",
    device: str | torch.device | None = None,
    rerank_top_k: int | None = None,
) -> list[list[dict[str, Any]]]:
    """The ``top_k`` nearest entries of ``index`` (a folder or Hub id; default the model's own ``index/``) for each
    query image, embedded by ``model`` (an exported folder or Hub id) with the ``torch`` or ``onnx`` backend. Same
    results format as the ``image-retrieval`` pipeline; a query that cannot be decoded is a ``ValueError``.

    ``rerank_top_k`` re-scores the K nearest with the model's re-ranker, on the tokens the index stores and the
    query's own from the same backbone pass as its embedding (torch backend only); items past K keep their order.
    """
    reranker = None
    if rerank_top_k is not None:
        if backend != "torch":
            raise ValueError("rerank_top_k needs the torch backend: the ONNX graph outputs the embedding only.")
        location = require_reranker(model, "rerank_top_k", "model")
    embedder, processor = load_embedder(model, backend=backend)
    if rerank_top_k is not None:
        reranker = load_reranker(location, embedder=embedder).to(device or "cpu")
    where = getattr(embedder, "folder", None) or os.fspath(model)  # ONNX Runtime: the resolved (downloaded) folder
    if index is None:
        try:
            found = EmbeddingIndex.from_pretrained(where, subfolder=DEFAULT_SUBFOLDER)
        except FileNotFoundError as error:
            message = f"the model {os.fspath(model)!r} has no {DEFAULT_SUBFOLDER}/ folder: pass --index."
            raise ValueError(message) from error
    else:
        found = EmbeddingIndex.from_pretrained(index)
    dim = embedder.config.embedding_dim
    if found.dim != dim:
        raise ValueError(
            f"the index holds {found.dim}-dimensional embeddings but the model makes {dim}-dimensional ones: use the "
            "index built with this model."
        )
    built_with = found.model.get("fingerprint")
    if built_with and built_with != model_reference(embedder).get("fingerprint"):
        logger.warning("The index was built with a different model: scores may be meaningless.")
    if reranker is not None:
        check_index_for_reranker(found, reranker)
    forward = embeddings_and_reranker_tokens(reranker.config.token_stage) if reranker is not None else pooler_output
    result = embed_images(embedder, processor, list(images), device=device, progress=False, forward=forward)
    if len(result.kept) != len(images):
        raise ValueError(f"query image(s) could not be decoded: {', '.join(result.skipped.files)}.")
    if reranker is not None:
        return search_and_rerank(found, reranker, result.embeddings, result.extras["tokens"], top_k, rerank_top_k)
    return found.search(result.embeddings, k=top_k)
