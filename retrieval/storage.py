"""The on-disk format of an :class:`~crossmetric.retrieval.index.EmbeddingIndex` folder, and its checks.

**Version 2** (written since the index became changeable): nothing per item is read onto the heap. A folder holds

- ``metadata.json``, the manifest, written last and swapped in atomically (its swap is what a reader such as
  ``crossmetric serve``'s watch sees): ``format_version``, ``kind``, ``metric``, ``dim``, ``count`` (live items),
  ``rows`` (stored rows), ``removed`` (rows removed and awaiting :meth:`compact`), search ``params``,
  ``calibration``, the ``model`` reference, ``head_tokens`` (shape, token stage), the user ``columns``, the list of
  ``segments`` and the current ``tombstones`` file, and a ``generation`` counter;
- per segment ``S`` (the rows added together: the build, then each ``add``; rows are numbered globally, segment
  after segment), the files :data:`SEGMENT_FILES` describes (:mod:`.segments`);
- ``tombstones-G.npy``: a packed bitmap of the removed rows; a change writes a new file, never rewrites one.

Every change writes its new files first and the manifest last, so a kill in the middle leaves the previous index
readable; files neither the current nor the previous manifest names are deleted by the next change (a reader that
read the previous manifest a moment ago can still open its files).

**Version 1** (the first format, still read): ``metadata.json`` with the per-row ``ids``, ``labels`` and ``paths``,
``embeddings.safetensors``, ``index.faiss`` and, with a re-ranker, ``head_tokens.safetensors``; all of it is read
onto the heap, as before. The first change to such a folder rewrites it as version 2.

Readers check that the files agree (counts, dimension, index type and metric) and name the file at fault, so that a
folder mixed from two saves fails before a search returns wrong neighbours. None of the files is a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from safetensors.numpy import load_file

FORMAT_VERSION = 2
METADATA_FILE = "metadata.json"
KINDS = ("exact", "hnsw", "ivf", "ivfpq")
# Version 1's files.
INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.safetensors"
EMBEDDINGS_KEY = "embeddings"
V1_FILES = (INDEX_FILE, EMBEDDINGS_FILE, "head_tokens.safetensors")
# Version 2's per-segment files ({} = the segment's name); which ones a segment has depends on its kind.
SEGMENT_FILES = {
    "items": "items-{}.arrow",  # Arrow IPC file: id, label, path, user metadata columns
    "index": "index-{}.faiss",  # the faiss index (exact/hnsw: holds the float32 vectors, memory-mapped)
    "ivfdata": "index-{}.ivfdata",  # IVF kinds: the inverted lists, memory-mapped (faiss IO_FLAG_ONDISK_SAME_DIR)
    "embeddings": "embeddings-{}.npy",  # IVF kinds: the vectors in row order (ivf float32, ivfpq float16)
    "tokens": "tokens-{}.npy",  # head tokens N×T×C float16 for re-ranking
    "idhash": "idhash-{}.npy",  # 2×N uint64: sorted hashes of the ids, and the local row of each
}
TOMBSTONES_FILE = "tombstones-{}.npy"
TRAINED_FILE = "trained-{}.faiss"  # ivfpq: the trained, empty index new segments are encoded with
INDEX_FILE_PATTERNS = tuple(p.format("*") for p in (*SEGMENT_FILES.values(), TOMBSTONES_FILE, TRAINED_FILE))
# What each kind is in faiss: HNSW sits in an IndexIDMap2 (ids = global row numbers, see kinds.py).
_FAISS_CLASS = {"exact": faiss.IndexFlat, "hnsw": faiss.IndexIDMap2, "ivf": faiss.IndexIVFFlat, "ivfpq": faiss.Index}


class IndexFormatError(ValueError):
    """A saved index folder is missing a file, or its files disagree; the message names the file."""


def read_metadata(path: Path) -> dict[str, Any]:
    """The manifest of an index folder (version 1 or 2), checked for the fields every reader relies on."""
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
    for key in ("count", "dim") if version == 1 else ("count", "dim", "rows", "generation"):
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "dim" else 0):
            raise IndexFormatError(f"{path}: {key} must be a positive integer, got {value!r}.")
    if version == 1:
        if meta["count"] < 1:
            raise IndexFormatError(f"{path}: count must be a positive integer, got {meta['count']!r}.")
        _check_v1_columns(path, meta)
    else:
        _check_v2_segments(path, meta)
    return meta


def _check_v1_columns(path: Path, meta: dict[str, Any]) -> None:
    for key in ("ids", "labels", "paths"):
        value = meta.get(key)
        if key == "ids" and not isinstance(value, list):
            raise IndexFormatError(f"{path}: ids must be a list.")
        if value is not None and (not isinstance(value, list) or len(value) != meta["count"]):
            length = len(value) if isinstance(value, list) else type(value).__name__
            raise IndexFormatError(f"{path}: {key} has {length} entries but count is {meta['count']}.")


def _check_v2_segments(path: Path, meta: dict[str, Any]) -> None:
    segments = meta.get("segments")
    if not isinstance(segments, list) or not all(
        isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("rows"), int) for s in segments
    ):
        raise IndexFormatError(f"{path}: segments must be a list of {{'name', 'rows'}} objects.")
    rows = sum(s["rows"] for s in segments)
    if rows != meta["rows"] or not 0 <= meta["count"] <= rows:
        raise IndexFormatError(f"{path}: the segments hold {rows} rows but rows={meta['rows']}, count={meta['count']}.")
    for segment in segments:
        for name in segment.get("files", []):
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                raise IndexFormatError(f"{path}: segment file name {name!r} is not a plain file name.")


def manifest_files(meta: dict[str, Any]) -> set[str]:
    """Every file a version-2 manifest names (its segments', its tombstones, its trained template)."""
    names = {name for segment in meta.get("segments", []) for name in segment.get("files", [])}
    for key in ("tombstones", "trained"):
        if meta.get(key):
            names.add(meta[key])
    return names


def is_index_file(name: str) -> bool:
    """Whether ``name`` is one of the files an index folder's writer owns (and may delete once unreferenced)."""
    stems = [pattern.split("{}")[0] for pattern in (*SEGMENT_FILES.values(), TOMBSTONES_FILE, TRAINED_FILE)]
    return name in V1_FILES or any(name.startswith(stem) for stem in stems)


# -- version 1 ---------------------------------------------------------------------------------------------------
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


def without_prefetch_threads(index: Any) -> Any:
    """Stop an index's on-disk lists from starting prefetch threads on every search; returns the index.

    faiss' ``OnDiskInvertedLists.prefetch_lists`` starts ``prefetch_nthread`` (default 32) threads per search to
    touch the lists it is about to scan. On a memory-mapped file the kernel's read-ahead does that job, and the
    threads cost more than the scan: measured on the 10^7 ``ivfpq`` benchmark index (2 cores, nprobe 64), one query
    took 8.4 ms with them and 2.2 ms without (0.33 ms against 4.0 ms at nprobe 1, from run to run).
    """
    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None and ivf.invlists is not None else None
    if isinstance(lists, faiss.OnDiskInvertedLists):
        lists.prefetch_nthread = 0
    return index


def read_faiss(path: Path, count: int, dim: int, kind: str, io_flags: int = 0) -> Any:
    """Read and check a faiss file: its class and metric are ``kind``'s, it holds ``count`` vectors of ``dim``."""
    if not path.is_file():
        raise IndexFormatError(f"{path} is missing: the index folder is incomplete. Rebuild the index.")
    try:
        index = faiss.read_index(str(path), io_flags)  # already downcast to its concrete class
    except RuntimeError as error:
        raise IndexFormatError(f"{path} is not a readable faiss index: {error}") from error
    without_prefetch_threads(index)
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
    return index
