"""What search, re-ranking, the pipeline and ``crossmetric serve`` ask of "an index", whichever engine holds it.

Two engines implement it: :class:`~crossmetric.retrieval.index.EmbeddingIndex` (a folder: faiss over memory-mapped
files) and :class:`~crossmetric.retrieval.milvus_index.MilvusIndex` (a Milvus collection: Milvus Lite in the process,
or a server). As LangChain and LlamaIndex keep their vector stores, callers take a :class:`GalleryIndex` and never
ask which engine it is; everything engine-specific (rows, files, collections) stays behind these methods.

Conventions shared by both engines:

- Scores are inner products of L2-normalised vectors (cosine similarity); results are best first.
- A result is ``{"id", "label", "score", "path"}`` (``label``/``path`` None where unknown).
- ``filter`` is ``{column: [allowed values, ...], ...}``: an item passes when, for every column named, its value is
  one of the allowed ones (OR within a column, AND across columns). It is applied inside the engine's search, so
  ``k`` results come back whenever ``k`` items pass, however few they are. ``label`` and ``path`` are columns, as
  are the metadata columns the index was built with.
- ``model`` is the reference of the model that embedded the gallery (``inference.embedding.model_reference``:
  ``name_or_path``, ``fingerprint``, ...); adding embeddings of another model is refused, naming both.
- Ids are strings and unique: adding an id that exists replaces its item (upsert); a removed id never comes back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

Filter = Mapping[str, Sequence[Any]]
Results = list[list[dict[str, Any]]]


@runtime_checkable
class GalleryIndex(Protocol):
    """A searchable, changeable gallery of embeddings (see the module docstring for the shared conventions)."""

    kind: str  # "exact", "hnsw", "ivf", "ivfpq" (folder) or "milvus"
    dim: int
    model: dict[str, Any]

    def __len__(self) -> int:
        """The number of live items (removed ones not counted)."""
        ...

    def search(
        self, query_embeddings: Any, k: int = 10, *, filter: Filter | None = None, **search_params: Any
    ) -> Results:
        """For each query row, its ``k`` nearest live items that pass ``filter``, best first."""
        ...

    def add(
        self,
        embeddings: Any,
        ids: Sequence[Any],
        labels: Sequence[str | None] | None = None,
        paths: Sequence[str | None] | None = None,
        metadata: Mapping[str, Sequence[Any]] | None = None,
        *,
        head_tokens: Any = None,
        model: Mapping[str, Any] | None = None,
    ) -> None:
        """Add items (upsert by id); ``head_tokens``: N×T×C for re-ranking; ``model``: the reference to check."""
        ...

    def remove(self, ids: Sequence[Any]) -> int:
        """Remove items by id; returns how many were present. Unknown ids are ignored."""
        ...

    def info(self) -> dict[str, Any]:
        """``kind``, ``count``, ``dim``, ``model`` and engine-specific facts (bytes on disk, removed rows, ...)."""
        ...

    def head_tokens_info(self) -> dict[str, Any] | None:
        """``{"shape": [T, C], "token_stage": ...}`` of the re-ranking tokens the index stores, or None."""
        ...

    def rerank_features(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings N×D float32, head tokens N×T×C)`` of the items ``ids``, in that order (re-ranking reads
        only its candidates)."""
        ...

    def records(self, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """``{"id", "label", "path", **metadata}`` of each id (None for an id not in the index)."""
        ...
