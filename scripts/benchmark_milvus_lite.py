"""Milvus Lite against the folder index on the same 10^5 items: insert/s, p50 query ms, recall@10.

    nice -n 10 python scripts/benchmark_milvus_lite.py [--count 100000] [--dim 128] [--queries 200]

For the record (issue 28): Milvus Lite is the development engine (tests, trying ``--milvus``), not the scale one, so
these figures say what a laptop user sees, not what a cluster does. Both engines get the same unit vectors (clustered:
1,000 centres with noise, as embeddings of many classes are) and the same queries (held-out vectors of the same
distribution); recall@10 is against the exact top 10 (a float64 matrix product). Both run on one thread
(``OMP_NUM_THREADS=1``; Milvus Lite's own engine is single-process). Measured per engine:

- insert/s: items / (adding them, in batches of 5,000 for Milvus, + a flush + the first search, which waits for
  whatever indexing is still pending; the folder: building the index and saving it);
- p50 and p95 query ms: one query at a time, k = 10 (the serving case), after 20 warm-up queries; Milvus by a
  client that opened the built collection afresh, as ``search`` and ``serve`` do;
- HNSW at the same settings on both (M 32, efConstruction 200, ef 64), and the folder's at its calibrated ef_search;
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
    gallery: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    index_type: str = "HNSW",
    ef_search: int = 64,
    batch: int = 5000,
) -> dict[str, Any]:
    """One row for a Milvus Lite collection (in this process, a temporary ``.db``) of ``gallery``."""
    from crossmetric.retrieval.milvus_index import MilvusIndex

    ids = [str(i) for i in range(len(gallery))]
    with tempfile.TemporaryDirectory() as folder:
        index = MilvusIndex.create(str(Path(folder) / "bench.db"), "bench", dim=gallery.shape[1], index_type=index_type)
        started = time.perf_counter()
        for start in range(0, len(gallery), batch):
            index.add(gallery[start : start + batch], ids[start : start + batch])
        index.flush()  # as a build does at its end: its rows are sealed into segments and their index files
        _wait_for_index_files(Path(folder) / "bench.db", index_type)
        insert_s = time.perf_counter() - started
        index.close()
        # queried as `crossmetric search` and `serve` do, by a client that opens the built collection: the process
        # that inserted keeps scanning its fresh rows (measured at 3*10^4 items: recall@10 1.0 and 166 ms a query
        # there, 0.79 and 48 ms once reopened, which is its HNSW answering)
        started = time.perf_counter()
        index = MilvusIndex(str(Path(folder) / "bench.db"), "bench")
        open_s = time.perf_counter() - started
        found, seconds = _latencies(lambda q, k: index.search(q, k=k, ef_search=ef_search), queries, 10)
        row = _row(f"Milvus Lite {index_type}", len(gallery), insert_s, seconds, recall_at(found, truth),
                   open_s=round(open_s, 2), params={"ef": ef_search} if index_type == "HNSW" else {})  # fmt: skip
        index.close()
    return row


def _wait_for_index_files(database: Path, index_type: str, limit_s: float = 1800) -> None:
    """Milvus Lite builds a sealed segment's HNSW after the flush returns, in the background (measured at 10^5
    items: no index file right after the flush, queries then scan every row, recall@10 1.0 at 430 ms; the file a
    minute later). Wait for its index files, so that insert/s counts the index build and the queries use it."""
    if index_type == "FLAT":
        return
    deadline = time.monotonic() + limit_s
    while not list(database.glob("collections/*/partitions/*/indexes/*.idx")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Milvus Lite wrote no index file under {database} in {limit_s} s.")
        time.sleep(0.5)


def measure_folder_index(
    gallery: np.ndarray, queries: np.ndarray, truth: np.ndarray, kind: str, ef_search: int | None = None
) -> dict[str, Any]:
    """One row for the folder index (``EmbeddingIndex``) of ``kind``, built in memory (HNSW: ef_search calibrated
    for recall@10 0.95, as ``index build`` does) and saved to a temporary folder (part of its insert time)."""
    from crossmetric.retrieval.index import EmbeddingIndex

    ids = [str(i) for i in range(len(gallery))]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        index = EmbeddingIndex(gallery, ids, kind=kind, **({"ef_search": ef_search} if ef_search else {}))
        index.save(Path(folder) / "index")
        insert_s = time.perf_counter() - started
        found, seconds = _latencies(lambda q, k: index.search(q, k=k), queries, 10)
    name = f"folder {kind}" + (f" ef_search {ef_search}" if ef_search else "")
    return _row(name, len(gallery), insert_s, seconds, recall_at(found, truth), params=index.params)


def _is(row: dict[str, Any], engine: str) -> bool:
    return row["engine"].startswith("folder") == (engine == "folder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--only", choices=("folder", "milvus"), default=None,
        help="measure one engine and replace its rows in --output (the others' are kept, with their run's time)",
    )  # fmt: skip
    args = parser.parse_args()
    import faiss
    import torch

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    # queries held out from the same blobs as the gallery (as a user's new photo of a known kind of thing); an
    # earlier run drew them around other centres, which no index's neighbourhoods had seen (recall 0.31 at ef 16)
    drawn = clustered_vectors(args.count + args.queries, args.dim, seed=0)
    gallery, queries = drawn[: args.count], drawn[args.count :]
    truth = exact_top(gallery, queries, 10)
    rows = []
    for engine, kind, ef_search in (
        ("folder", "exact", None), ("folder", "hnsw", None), ("folder", "hnsw", 64), ("milvus", "FLAT", 64),
        ("milvus", "HNSW", 64),
    ):  # fmt: skip
        if args.only is not None and engine != args.only:
            continue
        if engine == "folder":
            rows.append(measure_folder_index(gallery, queries, truth, kind, ef_search))
        else:
            rows.append(measure_milvus_lite(gallery, queries, truth, kind, ef_search))
        rows[-1]["measured_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(json.dumps(rows[-1]), flush=True)
    if args.only is not None and args.output.is_file():  # keep the other engine's rows from their run
        kept = [row for row in json.loads(args.output.read_text())["rows"] if not _is(row, args.only)]
        rows = kept + rows
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
