"""The faiss index of each kind: how it is built over a segment's rows, written, opened and searched.

- ``exact``: ``IndexFlatIP``; faiss ids are the segment's local positions. Written as faiss writes it, opened with
  ``IO_FLAG_MMAP_IFC`` so that its vectors stay in the file's pages (the index's only copy of them: a view of the
  same memory is what :mod:`.segments` hands out as the segment's embeddings).
- ``hnsw``: ``IndexHNSWFlat`` in an ``IndexIDMap2`` whose ids are global row numbers; its flat storage is memory-mapped
  the same way (the graph's neighbour lists are on the heap: faiss has no on-disk HNSW).
- ``ivf``: ``IndexIVFFlat`` (ids = global rows) whose inverted lists are written to ``index-S.ivfdata`` and opened in
  place (``IO_FLAG_ONDISK_SAME_DIR``): RAM holds the centroids and the list offsets, not the items.
- ``ivfpq``: see :mod:`.ivfpq` (on-disk IVF-PQ lists, exact re-scoring of ``k × refine`` candidates).

An approximate index without a search setting is calibrated while the first segment is built (held-out sample,
:mod:`.calibration`); later segments reuse the setting and, for IVF, the trained quantizer.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .calibration import calibrate, calibration_split, search_steps, set_search_param

logger = logging.getLogger(__name__)

DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_TARGET_RECALL = 0.95
_CHUNK = 1 << 16


def default_nlist(count: int) -> int:
    """IVF lists for ``count`` vectors: about sqrt(N), with at least 39 training points per list (faiss' minimum)."""
    return max(1, min(round(math.sqrt(count)), count // 39))


def initial_params(
    kind: str,
    count: int,
    *,
    hnsw_m: int = DEFAULT_HNSW_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    ef_search: int | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    max_memory: int | str | None = None,
    refine: int | None = None,
) -> dict[str, Any]:
    """The ``params`` of a new index of ``kind`` over ``count`` items (None settings are chosen at build time)."""
    if kind == "hnsw":
        return {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
    if kind == "ivf":
        nlist = default_nlist(count) if nlist is None else int(nlist)
        if not 1 <= nlist <= count:
            raise ValueError(f"nlist={nlist} must be between 1 and the number of embeddings ({count}).")
        return {"nlist": nlist, "nprobe": nprobe}
    if kind == "ivfpq":
        return {"nlist": nlist, "nprobe": nprobe, "max_memory": max_memory, "refine": refine}
    return {}


def uses_global_ids(kind: str) -> bool:
    """Whether the kind's faiss ids are global row numbers (else: positions within the segment)."""
    return kind != "exact"


def build(
    kind: str,
    vectors: np.ndarray,
    rows: np.ndarray,
    params: dict[str, Any],
    target_recall: float = DEFAULT_TARGET_RECALL,
    quantizer: Any = None,
) -> tuple[Any, dict[str, Any] | None]:
    """The in-memory faiss index of ``kind`` over ``vectors`` (their global ``rows``), and a calibration record.

    ``params`` is updated in place with a calibrated ``ef_search`` / ``nprobe`` where it had none. ``quantizer``: the
    trained IVF quantizer of an earlier segment (new rows are assigned to the same lists; no training).
    """
    dim = vectors.shape[1]
    count = len(vectors)
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
        for start in range(0, count, _CHUNK):
            index.add(np.ascontiguousarray(vectors[start : start + _CHUNK], dtype=np.float32))
        return index, None
    if kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = params["ef_construction"]
        index = faiss.IndexIDMap2(graph)
    elif kind == "ivf":
        if quantizer is None:
            nlist = params["nlist"]
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(_training_sample(vectors, nlist * 256))  # faiss' k-means samples 256 points per list too
        else:
            index = faiss.IndexIVFFlat(faiss.clone_index(quantizer), dim, quantizer.ntotal, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"kind {kind!r} is built by its own module")
    param = "ef_search" if kind == "hnsw" else "nprobe"
    if params.get(param) is not None or count < 2:
        index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), rows)
        params[param] = params.get(param) or search_steps(kind, index)[0]
        set_search_param(index, kind, params[param])
        return index, None
    rest, held = calibration_split(count)
    index.add_with_ids(vectors[rest], rows[rest])
    result = calibrate(index, vectors[rest], rows[rest], vectors[held], kind, target=target_recall)
    index.add_with_ids(vectors[held], rows[held])
    params[param] = result.value
    logger.info("Calibrated %s=%d (held-out recall@%d %.3f).", param, result.value, result.k, result.recall)
    return index, result.to_dict()


def _training_sample(vectors: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """All of ``vectors`` when there are at most ``size``, else a random sample of ``size`` rows (in row order)."""
    if len(vectors) <= size:
        return np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))
    return np.ascontiguousarray(vectors[rows], dtype=np.float32)


def apply_search_params(index: Any, kind: str, params: dict[str, Any]) -> None:
    """Set the index's stored search setting (``ef_search`` / ``nprobe``) on a faiss index just read."""
    if kind == "hnsw" and params.get("ef_search"):
        set_search_param(index, "hnsw", params["ef_search"])
    elif kind in ("ivf", "ivfpq") and params.get("nprobe"):
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])


def search_parameters(kind: str, params: dict[str, Any], overrides: dict[str, Any], selector: Any) -> Any:
    """faiss ``SearchParameters`` for one call: per-call ``ef_search`` / ``nprobe`` (else the index's), a selector.

    None when nothing differs from the index's own settings (the search is then exactly faiss' plain search). The
    parameters travel with the call, so the shared index is neither changed nor copied.
    """
    if kind == "hnsw":
        value = overrides.get("ef_search")
        if value is None and selector is None:
            return None
        return faiss.SearchParametersHNSW(efSearch=int(value or params["ef_search"]), sel=selector)
    if kind in ("ivf", "ivfpq"):
        value = overrides.get("nprobe")
        if value is None and selector is None:
            return None
        return faiss.SearchParametersIVF(nprobe=int(value or params["nprobe"]), sel=selector)
    return faiss.SearchParameters(sel=selector) if selector is not None else None


def write_ivf_ondisk(index: Any, trained: Any, folder: Path, stem: str) -> None:
    """Write an in-memory IVF index as ``stem.faiss`` + ``stem.ivfdata`` (its lists, opened in place on load).

    As faiss' ``contrib.ondisk.merge_ondisk``, without going through a file: the lists are copied into
    ``OnDiskInvertedLists`` of a copy of ``trained`` (the same index, trained and empty).
    """
    target = faiss.clone_index(trained)
    target_ivf = faiss.extract_index_ivf(target)
    source_ivf = faiss.extract_index_ivf(index)
    target_ivf.nprobe = source_ivf.nprobe
    invlists = faiss.OnDiskInvertedLists(target_ivf.nlist, target_ivf.code_size, str(folder / f"{stem}.ivfdata"))
    sources = faiss.InvertedListsPtrVector()
    sources.push_back(source_ivf.invlists)
    target.ntotal = target_ivf.ntotal = invlists.merge_from_multiple(sources.data(), sources.size(), False)
    target_ivf.replace_invlists(invlists, True)
    invlists.this.disown()
    faiss.write_index(target, str(folder / f"{stem}.faiss"))


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Keep faiss' messages off the process's standard output while on-disk lists are written or opened.

    faiss' ``OnDiskInvertedLists`` ("resizing ...") and its reader with ``IO_FLAG_ONDISK_SAME_DIR`` ("updating ondisk
    filename ...") ``printf`` unconditionally; commands such as ``crossmetric search`` print JSON on stdout, which these
    lines would break. File descriptor 1 points at ``/dev/null`` for the duration (C's buffers flushed first).
    """
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved, sink = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(sink, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(sink)


def flat_header(dim: int, count: int) -> bytes:
    """The bytes ``faiss.write_index`` puts before the vectors of an ``IndexFlatIP`` of ``count`` × ``dim``.

    Lets a builder stream an exact index to disk chunk by chunk (nothing per item in RAM); a test checks that the
    result is byte for byte what faiss writes.
    """
    header = bytearray(faiss.serialize_index(faiss.IndexFlatIP(dim)).tobytes())
    header[8:16] = np.int64(count).tobytes()
    header[-8:] = np.uint64(count * dim).tobytes()
    return bytes(header)
