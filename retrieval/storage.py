"""The on-disk format of an :class:`~crossmetric.retrieval.index.EmbeddingIndex` folder, and its checks.

Three files with fixed names (ids and paths are data and never become file names), none of them a pickle:

- ``metadata.json``: ``format_version``, ``kind``, ``metric``, ``dim``, ``count``, search ``params``, a ``model``
  reference, and the per-row ``ids``, ``labels`` and ``paths``;
- ``embeddings.safetensors``: one float32 tensor ``embeddings`` of shape count × dim, L2-normalised rows;
- ``index.faiss``: the faiss index (``faiss.write_index``) over the same vectors;
- with a model that has a re-ranker, ``head_tokens.safetensors``: each item's head tokens in float16, described in
  ``metadata.json`` under ``head_tokens`` (see :mod:`.head_tokens`).

Readers check that the three agree (counts, dimension, index type and metric, first and last vectors) and name
the file at fault, so that a folder mixed from two saves fails before a search returns wrong neighbours. Writers
build the folder next to its target and swap it in (``utils.atomic_files.staged_directory``), so an interrupted
save leaves the previous index readable.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from safetensors.numpy import load_file

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.safetensors"
METADATA_FILE = "metadata.json"
EMBEDDINGS_KEY = "embeddings"
KINDS = ("exact", "hnsw", "ivf")
# What each kind is on disk: HNSW sits in an IndexIDMap2 (ids = row numbers, see EmbeddingIndex._build).
_FAISS_CLASS = {"exact": faiss.IndexFlat, "hnsw": faiss.IndexIDMap2, "ivf": faiss.IndexIVFFlat}


class IndexFormatError(ValueError):
    """A saved index folder is missing a file, or its files disagree; the message names the file."""


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexFormatError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(meta, dict):
        raise IndexFormatError(f"{path} must hold a JSON object.")
    version = meta.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise IndexFormatError(f"{path} has no valid format_version: not an index written by EmbeddingIndex.save.")
    if version > FORMAT_VERSION:
        raise IndexFormatError(
            f"{path} has format_version {version}; this crossmetric reads up to {FORMAT_VERSION}: upgrade crossmetric."
        )
    if meta.get("kind") not in KINDS:
        raise IndexFormatError(f"{path}: kind {meta.get('kind')!r} is not one of {KINDS}.")
    for key in ("count", "dim"):
        if not isinstance(meta.get(key), int) or isinstance(meta.get(key), bool) or meta[key] < 1:
            raise IndexFormatError(f"{path}: {key} must be a positive integer, got {meta.get(key)!r}.")
    for key in ("ids", "labels", "paths"):
        value = meta.get(key)
        if key == "ids" and not isinstance(value, list):
            raise IndexFormatError(f"{path}: ids must be a list.")
        if value is not None and (not isinstance(value, list) or len(value) != meta["count"]):
            length = len(value) if isinstance(value, list) else type(value).__name__
            raise IndexFormatError(f"{path}: {key} has {length} entries but count is {meta['count']}.")
    return meta


def read_embeddings(path: Path, count: int, dim: int) -> np.ndarray:
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise IndexFormatError(f"{path} is not a readable safetensors file: {error}") from error
    embeddings = tensors.get(EMBEDDINGS_KEY)
    if embeddings is None:
        raise IndexFormatError(f"{path} has no tensor named {EMBEDDINGS_KEY!r} (it holds {sorted(tensors)}).")
    if embeddings.dtype != np.float32 or embeddings.shape != (count, dim):
        raise IndexFormatError(
            f"{path} holds {embeddings.dtype} embeddings of shape {embeddings.shape}, but {METADATA_FILE} says "
            f"count={count}, dim={dim} (float32). The files come from different saves: rebuild the index."
        )
    norms = np.linalg.norm(embeddings, axis=1)
    if not np.all(np.abs(norms - 1) < 1e-3):
        raise IndexFormatError(f"{path} holds rows that are not L2-normalised: the file is damaged.")
    return embeddings


def read_faiss(path: Path, count: int, dim: int, kind: str) -> Any:
    try:
        index = faiss.read_index(str(path))  # already downcast to its concrete class
    except RuntimeError as error:
        raise IndexFormatError(f"{path} is not a readable faiss index: {error}") from error
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else None
    if (
        not isinstance(index, _FAISS_CLASS[kind])
        or (kind == "hnsw" and not isinstance(inner, faiss.IndexHNSWFlat))
        or index.metric_type != faiss.METRIC_INNER_PRODUCT
    ):
        raise IndexFormatError(
            f"{path} is a {type(index).__name__} (metric {index.metric_type}), but {METADATA_FILE} says kind="
            f"{kind!r} with inner-product metric."
        )
    if index.ntotal != count or index.d != dim:
        raise IndexFormatError(
            f"{path} holds {index.ntotal} vectors of dimension {index.d}, but {METADATA_FILE} says count={count}, "
            f"dim={dim}. The files come from different saves: rebuild the index."
        )
    if kind == "ivf":
        index.make_direct_map()  # lets reconstruct() check the stored vectors against the embeddings file
    return index
