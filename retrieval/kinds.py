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

import logging
import math
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
            index.train(np.ascontiguousarray(vectors, dtype=np.float32))
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


def write_ivf_ondisk(index: Any, folder: Path, stem: str) -> None:
    """Write an in-memory ``IndexIVFFlat`` as ``stem.faiss`` + ``stem.ivfdata`` (its lists, opened in place on load).

    As faiss' ``contrib.ondisk.merge_ondisk``, without going through a file: the lists are copied into
    ``OnDiskInvertedLists`` of an empty index over the same (cloned) quantizer.
    """
    quantizer = faiss.clone_index(index.quantizer)
    target = faiss.IndexIVFFlat(quantizer, index.d, index.nlist, index.metric_type)
    target.own_fields = True
    quantizer.this.disown()
    target.nprobe = index.nprobe
    invlists = faiss.OnDiskInvertedLists(target.nlist, target.code_size, str(folder / f"{stem}.ivfdata"))
    sources = faiss.InvertedListsPtrVector()
    sources.push_back(index.invlists)
    target.ntotal = invlists.merge_from_multiple(sources.data(), sources.size(), False)
    target.replace_invlists(invlists, True)
    invlists.this.disown()
    faiss.write_index(target, str(folder / f"{stem}.faiss"))


def flat_header(dim: int, count: int) -> bytes:
    """The bytes ``faiss.write_index`` puts before the vectors of an ``IndexFlatIP`` of ``count`` × ``dim``.

    Lets a builder stream an exact index to disk chunk by chunk (nothing per item in RAM); a test checks that the
    result is byte for byte what faiss writes.
    """
    header = bytearray(faiss.serialize_index(faiss.IndexFlatIP(dim)).tobytes())
    header[8:16] = np.int64(count).tobytes()
    header[-8:] = np.uint64(count * dim).tobytes()
    return bytes(header)
