"""A model loaded once for querying: the embedder, its image processor and its re-ranker, in one object.

``crossmetric search`` used to enter model loading three times (to check the argument, to resolve it, to load it),
and re-ranker loading as often. :meth:`LoadedModel.load` classifies the argument once (``resolve_model``), looks
for the re-ranker once when re-ranking is asked for (refusing a model without one before any weight is read), then
loads the embedder, its processor and the re-ranker (sharing that embedder: one backbone) once. Search
(``retrieval.search.search_images``), the ``image-retrieval`` pipeline (``retrieval.pipeline.retrieval_pipeline``)
and ``crossmetric serve`` take the object, together with "an index" of either engine (``retrieval.protocol``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .embedding import embed_images, embeddings_and_reranker_tokens, model_reference, pooler_output
from .loading import load_resolved_embedder, resolve_model
from .onnx_runtime import check_backend
from .reranker_loading import load_reranker, no_reranker_message, resolved_reranker

RERANK_NEEDS_TORCH = "re-ranking needs the torch backend: the ONNX graph outputs the embedding, not the head's tokens."


@dataclass
class LoadedModel:
    """The embedder, its image processor and (when re-ranking) its re-ranker, loaded once.

    Attributes:
        embedder: a ``CrossMetricModel`` (torch) or an ONNX Runtime embedder.
        processor: its image processor.
        reranker: a ``CrossMetricReranker`` sharing ``embedder``, or None.
        source: where it was loaded from (the resolved export folder, the downloaded ONNX folder, or the Hub id);
            the model's own ``index/`` is looked for there.
        backend: ``"torch"`` or ``"onnx"``.
        reference: what an index records about the model (``embedding.model_reference``), computed once.
    """

    embedder: Any
    processor: Any
    reranker: Any = None
    source: str = ""
    backend: str = "torch"
    reference: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        *,
        backend: str = "torch",
        rerank: bool = False,
        device: str | torch.device | None = None,
        flag: str = "--model",
        option: str = "--rerank_top_k",
        resolved: tuple[str, Any] | None = None,
        reranker_at: tuple[str, str | None] | None = None,
    ) -> LoadedModel:
        """Load ``model`` (an exported folder, a run folder, a checkpoint or a Hub id) with ``backend``; with
        ``rerank``, its re-ranker too (refused, naming ``option`` and ``flag``, before any weight is read when the
        model has none, or with the ONNX backend). The torch models are moved to ``device`` (default: cpu).
        ``resolved``: ``resolve_model(model)``'s answer, and ``reranker_at``: where the re-ranker is
        (``reranker_loading.find_reranker``), when the caller already has them (they are not asked again)."""
        check_backend(backend)
        if rerank and backend != "torch":
            raise ValueError(RERANK_NEEDS_TORCH)
        if backend == "onnx":
            from .onnx_runtime import load_onnx_embedder

            embedder, processor = load_onnx_embedder(model)
            source = str(getattr(embedder, "folder", None) or os.fspath(model))
            return cls(embedder, processor, None, source, backend, model_reference(embedder))
        kind, resolved = resolved or resolve_model(model, flag)
        location = (reranker_at or resolved_reranker(kind, resolved, flag=flag)) if rerank else None
        if rerank and location is None:
            raise ValueError(no_reranker_message(model, option, flag))
        embedder, processor = load_resolved_embedder(kind, resolved, flag=flag, given=model)
        embedder = embedder.to(device or "cpu").eval()
        reranker = None
        if location is not None:
            reranker = load_reranker(location, embedder=embedder).to(device or "cpu").eval()
        return cls(embedder, processor, reranker, str(resolved), backend, model_reference(embedder))

    @property
    def dim(self) -> int:
        """The embedding size."""
        return int(self.embedder.config.embedding_dim)

    @property
    def token_stage(self) -> str | None:
        """The backbone stage whose tokens the re-ranker reads (None without a re-ranker)."""
        return self.reranker.config.token_stage if self.reranker is not None else None

    def embed(
        self, images: Any, *, device: str | torch.device | None = None, batch_size: int = 64, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``(embeddings Q×D, re-ranker tokens Q×T×C or None)`` of query ``images`` (one backbone pass each); an
        image that cannot be decoded is a ``ValueError`` naming it."""
        images = list(images)
        forward = embeddings_and_reranker_tokens(self.token_stage) if self.reranker is not None else pooler_output
        result = embed_images(self.embedder, self.processor, images, batch_size, device, progress, forward=forward)
        if len(result.kept) != len(images):
            raise ValueError(f"query image(s) could not be decoded: {', '.join(result.skipped.files)}.")
        return result.embeddings, result.extras.get("tokens") if self.reranker is not None else None
