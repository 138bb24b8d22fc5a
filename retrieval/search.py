"""``crossmetric search``: query images embedded by the one embedding loop (PyTorch or ONNX Runtime), searched in
"an index" (a folder or a Milvus collection, :mod:`.protocol`); with ``rerank_top_k``, the K nearest re-ranked by the
model's re-ranker (:mod:`.reranking`).

The model is a :class:`~crossmetric.inference.loaded_model.LoadedModel` (embedder, processor and re-ranker loaded
once), or a model argument that is loaded into one here.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..inference.loaded_model import LoadedModel
from .compatibility import check_index_for_model
from .hub import DEFAULT_SUBFOLDER
from .protocol import Filter, GalleryIndex
from .reranking import check_index_for_reranker, search_and_rerank


def open_index(index: str | os.PathLike | GalleryIndex | None, loaded: LoadedModel) -> GalleryIndex:
    """``index`` itself when it is an index object, the folder or Hub repo it names, else the model's own
    ``index/`` (a ``ValueError`` saying to pass one when the model has none)."""
    from .index import EmbeddingIndex

    if index is not None and not isinstance(index, (str, os.PathLike)):
        return index
    if index is not None:
        return EmbeddingIndex.from_pretrained(index)
    try:
        return EmbeddingIndex.from_pretrained(loaded.source, subfolder=DEFAULT_SUBFOLDER)
    except FileNotFoundError as error:
        raise ValueError(f"the model {loaded.source!r} has no {DEFAULT_SUBFOLDER}/ folder: pass --index.") from error


def search_images(
    model: str | os.PathLike | LoadedModel,
    index: str | os.PathLike | GalleryIndex | None,
    images: list[str],
    top_k: int = 5,
    *,
    backend: str = "torch",
    device: str | torch.device | None = None,
    rerank_top_k: int | None = None,
    filter: Filter | None = None,
) -> list[list[dict[str, Any]]]:
    """The ``top_k`` nearest entries of ``index`` for each query image, embedded by ``model``. Same results format as
    the ``image-retrieval`` pipeline; a query that cannot be decoded is a ``ValueError``.

    Args:
        model: a :class:`LoadedModel`, or an exported folder or Hub id (loaded with ``backend`` on ``device``).
        index: an index object (``EmbeddingIndex``, ``MilvusIndex``), a folder or Hub id, or None (the model's own
            ``index/``). An index of another model is refused, naming both.
        rerank_top_k: re-score the K nearest with the model's re-ranker, on the tokens the index stores and the
            query's own from the same backbone pass as its embedding (torch backend only); items past K keep their
            order.
        filter: ``{column: [allowed values]}``, applied inside the index's search.
    """
    if not isinstance(model, LoadedModel):
        model = LoadedModel.load(model, backend=backend, rerank=rerank_top_k is not None, device=device)
    elif rerank_top_k is not None and model.reranker is None:
        raise ValueError("rerank_top_k needs a LoadedModel loaded with rerank=True (the model's re-ranker).")
    found = open_index(index, model)
    check_index_for_model(found, model.reference, model.dim)
    reranker = model.reranker if rerank_top_k is not None else None
    if reranker is not None:
        check_index_for_reranker(found, reranker)
    embeddings, tokens = model.embed(images, device=device)
    options = {"filter": filter} if filter else {}
    if reranker is not None:
        return search_and_rerank(found, reranker, embeddings, tokens, top_k, rerank_top_k, **options)
    return found.search(embeddings, k=top_k, **options)
