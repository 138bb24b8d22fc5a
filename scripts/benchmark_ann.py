"""Recall@K and speed of the approximate indexes (HNSW, IVF) against exact search, on synthetic embeddings.

Two data sets of unit vectors (dimension ``--dim``), each with ``--n`` indexed vectors and ``--queries`` held-out
queries from the same distribution:

- ``clustered``: a mixture of ``--clusters`` Gaussian blobs (centres ~ N(0, I), spread ``--spread``), the shape
  that trained DML embeddings have (one blob per class);
- ``gaussian``: pure isotropic Gaussian, the hardest case for any approximate index (in high dimension every
  point is almost equally far from every other).

For each data set, builds the exact, HNSW and IVF :class:`crossmetric.EmbeddingIndex` with the library defaults,
times build and search, and reports recall@K of each approximate index against the exact one (the fraction of
the exact top-K it also returns), at the defaults and along a sweep of ``ef_search`` / ``nprobe``.

Exit status 1 when an index at its default settings stays below ``--min-recall`` on a data set named by
``--require`` (default: HNSW on both, IVF on clustered data).

    python scripts/benchmark_ann.py                   # 50k vectors, dim 128 (a few minutes on 2 cores)
    python scripts/benchmark_ann.py --n 5000 --json-out ann.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import faiss
import numpy as np

from crossmetric.retrieval.index import EmbeddingIndex


def make_data(kind: str, n: int, dim: int, clusters: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors of the named distribution (centres drawn once per call: pass one rng for index+queries)."""
    if kind == "gaussian":
        data = rng.standard_normal((n, dim))
    else:
        centres = rng.standard_normal((clusters, dim))
        data = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    data = data.astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / K (ids -1, i.e. not found, never match)."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def timed_search(index: EmbeddingIndex, queries: np.ndarray, k: int, **params: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, rows = index.search_arrays(queries, k, **params)
    return rows, time.perf_counter() - start


def run(args: argparse.Namespace) -> tuple[list[dict], bool]:
    rows, ok = [], True
    required = {tuple(r.split(":")) for r in args.require}
    for data_kind in args.data:
        rng = np.random.default_rng(args.seed)
        both = make_data(data_kind, args.n + args.queries, args.dim, args.clusters, args.spread, rng)
        vectors, queries = both[: args.n], both[args.n :]
        ids = [str(i) for i in range(args.n)]
        indexes = {}
        for kind in ("exact", "hnsw", "ivf"):
            start = time.perf_counter()
            indexes[kind] = EmbeddingIndex(vectors, ids, kind=kind)
            build = time.perf_counter() - start
            found, seconds = timed_search(indexes[kind], queries, args.k)
            if kind == "exact":
                truth = found
            recall = recall_at_k(found, truth)
            row = {
                "data": data_kind,
                "kind": kind,
                "params": dict(indexes[kind].params),
                "default": True,
                "build_s": round(build, 3),
                "search_ms_per_query": round(1000 * seconds / len(queries), 4),
                f"recall@{args.k}": round(recall, 4),
                "calibration": indexes[kind].calibration,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if (kind, data_kind) in required and recall < args.min_recall:
                ok = False
        sweeps = {"hnsw": ("ef_search", [16, 32, 64, 128, 256, 512])}
        nlist = indexes["ivf"].params["nlist"]
        sweeps["ivf"] = ("nprobe", sorted({max(1, round(nlist * f)) for f in (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)}))
        for kind, (name, values) in sweeps.items():
            for value in values:
                found, seconds = timed_search(indexes[kind], queries, args.k, **{name: value})
                row = {
                    "data": data_kind,
                    "kind": kind,
                    "params": {**indexes[kind].params, name: value},
                    "default": False,
                    "search_ms_per_query": round(1000 * seconds / len(queries), 4),
                    f"recall@{args.k}": round(recall_at_k(found, truth), 4),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows, ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=50_000, help="indexed vectors per data set")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clusters", type=int, default=1000, help="blobs in the clustered data")
    parser.add_argument("--spread", type=float, default=1.0, help="blob standard deviation (centres have std 1)")
    parser.add_argument("--data", nargs="+", default=["clustered", "gaussian"], choices=["clustered", "gaussian"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="faiss OpenMP threads (0: faiss default)")
    parser.add_argument("--min-recall", type=float, default=0.95)
    parser.add_argument(
        "--require",
        nargs="*",
        default=["hnsw:clustered", "hnsw:gaussian", "ivf:clustered"],
        help="KIND:DATA pairs whose default settings must reach --min-recall",
    )
    parser.add_argument("--json-out", default=None, help="also write all rows to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; n={args.n} dim={args.dim}", flush=True)
    rows, ok = run(args)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=1)
    print("PASS" if ok else f"FAIL: a required index stayed below recall {args.min_recall} at its defaults")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
