"""Whether an index fits the model that queries it: the same embedding size, and the same weights.

Every caller that puts a model's queries to "an index" (``crossmetric search``, the pipeline, ``crossmetric serve``)
asks :func:`check_index_for_model` first, whatever engine holds the index. Embeddings of two different models live in
unrelated spaces, so their cosines mean nothing: a query from another model is refused, naming both models. The
weights are compared by the fingerprint ``inference.embedding.model_reference`` records; an index that recorded none
(built before fingerprints) is let through.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def describe_model(reference: Mapping[str, Any] | None) -> str:
    """A model reference in one phrase: its name or path and the start of its weight fingerprint."""
    if not reference:
        return "an unrecorded model"
    name = reference.get("name_or_path") or "an unnamed model"
    fingerprint = reference.get("fingerprint")
    return f"{name!r} (fingerprint {str(fingerprint)[:12]})" if fingerprint else repr(name)


def same_model(stored: Mapping[str, Any] | None, other: Mapping[str, Any] | None) -> bool:
    """Whether two references name the same weights (True when either has no fingerprint to compare)."""
    first, second = (stored or {}).get("fingerprint"), (other or {}).get("fingerprint")
    return not first or not second or first == second


def check_index_for_model(index: Any, reference: Mapping[str, Any], dim: int | None = None) -> None:
    """Refuse ``index`` for queries of the model ``reference`` (embedding size ``dim``): another size, or other
    weights, is a ``ValueError`` that names the index's model and the query's."""
    built_with = getattr(index, "model", None) or {}
    if dim is not None and index.dim != dim:
        raise ValueError(
            f"the index holds {index.dim}-dimensional embeddings but the model makes {dim}-dimensional ones (the "
            f"index's model: {describe_model(built_with)}; the query's: {describe_model(reference)}): use the index "
            "built with this model."
        )
    if not same_model(built_with, reference):
        raise ValueError(
            f"the index was built with {describe_model(built_with)}, but the query comes from "
            f"{describe_model(reference)}: search it with the model that built it, or rebuild the index with this one."
        )
