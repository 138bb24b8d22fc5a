"""Milvus Lite against the folder index on the same 10^5 items: insert/s, p50 query ms, recall@10.

    nice -n 10 python scripts/benchmark_milvus_lite.py [--count 100000] [--dim 128] [--queries 200]

For the record (issue 28): Milvus Lite is the development engine (tests, trying ``--milvus``), not the scale one, so
these figures say what a laptop user sees, not what a cluster does. Both engines get the same unit vectors (clustered:
1,000 centres with noise, as embeddings of many classes are) and the same queries (held-out vectors of the same
distribution); recall@10 is against the exact top 10 (a float64 matrix product). Both run on one thread
(``OMP_NUM_THREADS=1``; Milvus Lite's own engine is single-process). Measured per engine:

- insert/s: items / (adding them, in batches of 5,000 for Milvus, + a flush + the first search, which waits for
  whatever indexing is still pending; the folder: building the index and saving it);
- p50 and p95 query ms: one query at a time, k = 10 (the serving case), after 20 warm-up queries;
- recall@10.

:func:`measure_milvus_lite` and :func:`measure_folder_index` return the rows; ``scripts/benchmark_index_scale.py``
may call them. The JSON goes to ``scripts/benchmark_results/index_scale/milvus_lite.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "benchmark_results" / "index_scale" / "milvus_lite.json"


def clustered_vectors(count: int, dim: int, seed: int, centres: int = 1000) -> np.ndarray:
    """``count`` unit vectors around ``centres`` random unit centres (noise of a third of a centre's length)."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((centres, dim)).astype(np.float32)
    centre /= np.linalg.norm(centre, axis=1, keepdims=True)
    vectors = centre[rng.integers(0, centres, count)] + rng.standard_normal((count, dim)).astype(np.float32) / (
        3 * np.sqrt(dim)
    )
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def exact_top(gallery: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers of each query's exact ``k`` nearest (float64 inner products, in blocks)."""
    out = []
    for start in range(0, len(queries), 64):
        scores = queries[start : start + 64].astype(np.float64) @ gallery.T.astype(np.float64)
        out.append(np.argsort(-scores, axis=1)[:, :k])
    return np.concatenate(out)


def recall_at(found: list[list[str]], truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & {str(t) for t in row[:k]}) / k for f, row in zip(found, truth)]))


WARM_UP = 20


def _latencies(search: Any, queries: np.ndarray, k: int) -> tuple[list[list[str]], list[float]]:
    """Each query's ids and seconds, one query at a time, after :data:`WARM_UP` queries of the same set."""
    for query in queries[:WARM_UP]:
        search(query[None, :], k)
    found, seconds = [], []
    for query in queries:
        started = time.perf_counter()
        hits = search(query[None, :], k)
        seconds.append(time.perf_counter() - started)
        found.append([hit["id"] for hit in hits[0]])
    return found, seconds


def _row(engine: str, count: int, insert_s: float, seconds: list[float], recall: float, **extra: Any) -> dict:
    return {
        "engine": engine, "count": count, "insert_per_s": round(count / insert_s, 1), "insert_s": round(insert_s, 2),
        "p50_query_ms": round(1000 * float(np.median(seconds)), 3),
        "p95_query_ms": round(1000 * float(np.percentile(seconds, 95)), 3), "recall_at_10": round(recall, 4), **extra,
    }  # fmt: skip


def measure_milvus_lite(
    gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray, index_type: str = "HNSW", batch: int = 5000
) -> dict[str, Any]:
    """One row for a Milvus Lite collection (in this process, a temporary ``.db``) of ``gallery``."""
    from crossmetric.retrieval.milvus_index import MilvusIndex

    ids = [str(i) for i in range(len(gallery))]
    with tempfile.TemporaryDirectory() as folder:
        index = MilvusIndex.create(str(Path(folder) / "bench.db"), "bench", dim=gallery.shape[1], index_type=index_type)
        started = time.perf_counter()
        for start in range(0, len(gallery), batch):
            index.add(gallery[start : start + batch], ids[start : start + batch])
        index.flush()  # as a build does at its end: fresh rows are otherwise scanned by every search
        index.search(queries[:1], k=10)  # the first search waits for whatever indexing is still pending
        insert_s = time.perf_counter() - started
        found, seconds = _latencies(lambda q, k: index.search(q, k=k), queries, 10)
        row = _row(f"Milvus Lite {index_type}", len(gallery), insert_s, seconds, recall_at(found, truth))
        index.close()
    return row


def measure_folder_index(gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray, kind: str) -> dict[str, Any]:
    """One row for the folder index (``EmbeddingIndex``) of ``kind``, built in memory (HNSW: ef_search calibrated
    for recall@10 0.95, as ``index build`` does) and saved to a temporary folder (part of its insert time)."""
    from crossmetric.retrieval.index import EmbeddingIndex

    ids = [str(i) for i in range(len(gallery))]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        index = EmbeddingIndex(gallery, ids, kind=kind)
        index.save(Path(folder) / "index")
        insert_s = time.perf_counter() - started
        found, seconds = _latencies(lambda q, k: index.search(q, k=k), queries, 10)
    return _row(f"folder {kind}", len(gallery), insert_s, seconds, recall_at(found, truth), params=index.params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    gallery = clustered_vectors(args.count, args.dim, seed=0)
    queries = clustered_vectors(args.queries, args.dim, seed=1)
    truth = exact_top(gallery, queries, 10)
    rows = []
    for engine, kind in (("folder", "exact"), ("folder", "hnsw"), ("milvus", "FLAT"), ("milvus", "HNSW")):
        measure = measure_folder_index if engine == "folder" else measure_milvus_lite
        rows.append(measure(gallery, queries, truth, kind))
        print(json.dumps(rows[-1]), flush=True)
    from importlib.metadata import version

    result = {
        "what": "Milvus Lite (in-process, pymilvus MilvusClient) against the folder index on the same vectors",
        "count": args.count, "dim": args.dim, "queries": args.queries, "k": 10,
        "threads": os.environ.get("OMP_NUM_THREADS"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "pymilvus": version("pymilvus"), "milvus_lite": version("milvus-lite"),
        "rows": rows,
    }  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
