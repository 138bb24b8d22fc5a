"""``crossmetric search --backend onnx``: query embeddings from ONNX Runtime, searched in a saved index."""

from __future__ import annotations

import os
from typing import Any

from ..evaluation.embedding import embed_images
from ..evaluation.onnx_embedding import load_onnx_embedder
from .hub import DEFAULT_SUBFOLDER
from .index import EmbeddingIndex


def search_with_onnx(
    model: str | os.PathLike, index: str | os.PathLike | None, images: list[str], top_k: int = 5
) -> list[list[dict[str, Any]]]:
    """``crossmetric search --backend onnx``: embed the query files with ONNX Runtime and search ``index`` (a folder
    or Hub id; default the model's own ``index/``). Same results format as the ``image-retrieval`` pipeline."""
    import logging

    embedder, processor = load_onnx_embedder(model)
    if index is None:
        found = EmbeddingIndex.from_pretrained(embedder.folder, subfolder=DEFAULT_SUBFOLDER)
    else:
        found = EmbeddingIndex.from_pretrained(index)
    if found.dim != embedder.config.embedding_dim:
        raise ValueError(
            f"the index holds {found.dim}-dimensional embeddings but the model makes {embedder.config.embedding_dim}"
            "-dimensional ones: use the index built with this model."
        )
    built_with = found.model.get("fingerprint")
    if built_with and built_with != embedder.model_reference().get("fingerprint"):
        logging.getLogger(__name__).warning("The index was built with a different model: scores may be meaningless.")
    result = embed_images(embedder, processor, list(images), progress=False)
    if len(result.kept) != len(images):
        raise ValueError(f"query image(s) could not be decoded: {', '.join(result.skipped.files)}.")
    return found.search(result.embeddings, k=top_k)
