"""``kind="ivfpq"`` inside :class:`~.index.EmbeddingIndex`: the faiss-level parts are :mod:`.ivfpq`'s; this module
sizes, trains and calibrates the index of a new gallery and encodes later segments with the same trained index.

Settings kept in the index's ``params``: ``max_memory`` (bytes; default :data:`DEFAULT_MAX_MEMORY`), the chosen
``factory``, ``nlist`` and ``code_size``, ``refine`` (``k × refine`` candidates re-scored exactly against the float16
embeddings; default :data:`.ivfpq.DEFAULT_REFINE`) and ``nprobe``, calibrated like ``ivf``'s: the smallest power of
two whose recall@10 against exact search reaches the target on a sample of the gallery's own vectors (each asked for
its neighbours other than itself, the way a held-out query would be).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .ivfpq import (
    DEFAULT_REFINE,
    ivfpq_layout,
    parse_memory,
    read_ondisk,
    search_refined,
    train_ivf,
    training_sample_size,
    write_ondisk,
)
from .kinds import quiet_stdout

logger = logging.getLogger(__name__)
DEFAULT_MAX_MEMORY = "2G"
_CHUNK = 1 << 16


def _sizing(index: Any, vectors: np.ndarray) -> Any:
    """Pick the layout from the count and budget, and train the empty index on a sample (kept as ``trained``)."""
    params = index.params
    budget = parse_memory(params.get("max_memory") or DEFAULT_MAX_MEMORY)
    layout = ivfpq_layout(len(vectors), index.dim, budget)
    size = training_sample_size(layout, len(vectors))
    rows = np.sort(np.random.default_rng(0).choice(len(vectors), size=size, replace=False))
    trained = train_ivf(np.asarray(vectors[rows], dtype=np.float32), layout)
    params.update(max_memory=budget, factory=layout.factory, nlist=layout.nlist, code_size=layout.code_size)
    params["refine"] = int(params.get("refine") or DEFAULT_REFINE)
    return trained


def build_ivfpq(
    index: Any, vectors: np.ndarray, rows: np.ndarray, target_recall: float
) -> tuple[Any, dict[str, Any] | None]:
    """An in-memory IVF-PQ faiss index over ``vectors`` (global ``rows``), trained first when the index has no
    trained template yet; its ``nprobe`` calibrated when unset. ``(faiss index, calibration record or None)``."""
    import faiss

    if index.trained is None:
        index.trained = _sizing(index, vectors)
    built = faiss.clone_index(index.trained)
    built.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), rows)
    calibration = None
    if index.params.get("nprobe") is None:
        calibration = calibrate_nprobe(built, vectors, index.params["refine"], target_recall)
        index.params["nprobe"] = calibration["value"]
    faiss.extract_index_ivf(built).nprobe = int(index.params["nprobe"])
    return built, calibration


def build_ondisk(
    index: Any, vectors: np.ndarray, folder: Path, names: dict[str, str], target_recall: float, progress: bool
) -> tuple[dict[str, Any] | None, Any]:
    """A builder's ivfpq segment from memory-mapped float32 ``vectors``: trained on a sample, encoded chunk by chunk
    into on-disk lists (:func:`.ivfpq.write_ondisk`), calibrated, and the float16 embeddings written for
    re-scoring. Returns ``(calibration record, trained index)``."""
    trained = _sizing(index, vectors)
    count = len(vectors)
    chunks = ((vectors[s : s + _CHUNK], np.arange(s, min(s + _CHUNK, count), dtype=np.int64))
              for s in range(0, count, _CHUNK))  # fmt: skip
    stem = names["index"].rsplit(".", 1)[0]
    with quiet_stdout():
        write_ondisk(trained, chunks, folder, stem, progress)
    half = np.lib.format.open_memmap(folder / names["embeddings"], mode="w+", dtype=np.float16, shape=vectors.shape)
    for start in range(0, count, _CHUNK):
        half[start : start + _CHUNK] = vectors[start : start + _CHUNK]
    half.flush()
    del half
    Path(vectors.filename).unlink()  # type: ignore[attr-defined] - the float32 copy the builder streamed
    calibration = None
    if index.params.get("nprobe") is None:
        with quiet_stdout():
            built = read_ondisk(folder / names["index"])
        stored = np.load(folder / names["embeddings"], mmap_mode="r")
        calibration = calibrate_nprobe(built, stored, index.params["refine"], target_recall)
        index.params["nprobe"] = calibration["value"]
        del built
    return calibration, trained


def calibrate_nprobe(
    built: Any, vectors: np.ndarray, refine: int, target: float, *, k: int = 10, sample: int = 256
) -> dict[str, Any]:
    """The smallest power-of-two ``nprobe`` whose refined recall@k reaches ``target`` on ``sample`` of the vectors
    (each query's own row left out of both the truth and the answer); the record as :mod:`.calibration` writes."""
    import faiss

    count = len(vectors)
    ivf = faiss.extract_index_ivf(built)
    queries_rows = np.sort(np.random.default_rng(1).choice(count, size=min(sample, count), replace=False))
    queries = np.asarray(vectors[queries_rows], dtype=np.float32)
    k = min(k, count - 1)
    truth = _exact_neighbours(vectors, queries, queries_rows, k)
    recall, nprobe = 0.0, 1
    steps = sorted({min(ivf.nlist, 2**i) for i in range(int(np.ceil(np.log2(max(ivf.nlist, 1)))) + 1)})
    for nprobe in steps:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        _, found = search_refined(built, lambda rows: vectors[rows], queries, k + 1, refine=refine, params=params)
        hits = [len(set(f[f != own].tolist()[:k]) & set(t)) / k for f, t, own in zip(found, truth, queries_rows)]
        recall = float(np.mean(hits))
        if recall >= target:
            break
    else:
        logger.warning(
            "ivfpq: recall@%d reached only %.3f of the target %.2f even with all %d lists probed; the codes are too "
            "coarse for refine=%d: pass a larger --refine (or --max_memory for longer codes), or accept the recall.",
            k, recall, target, ivf.nlist, refine,
        )  # fmt: skip
    return {"parameter": "nprobe", "value": int(nprobe), "recall": round(recall, 4), "k": k,
            "queries": len(queries), "target": target}  # fmt: skip


def _exact_neighbours(vectors: np.ndarray, queries: np.ndarray, own: np.ndarray, k: int) -> list[list[int]]:
    """Each query's exact top ``k`` rows other than its own, by blocks of the (memory-mapped) vectors."""
    from .selection import merge_top_k

    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_rows = np.full((len(queries), k), -1, np.int64)
    for start in range(0, len(vectors), _CHUNK):
        block = np.asarray(vectors[start : start + _CHUNK], dtype=np.float32)
        scores = queries @ block.T
        rows = np.arange(start, start + len(block))
        scores[own[:, None] == rows[None, :]] = -np.inf
        best_scores, best_rows = merge_top_k([best_scores, scores], [best_rows, np.broadcast_to(rows, scores.shape)], k)
    return [row.tolist() for row in best_rows]
