"""One fresh process of ``benchmark_index_scale.py``: load one index, answer the queries, report heap and speed.

Run by the benchmark as ``python scripts/_index_scale_measure.py SPEC.json`` (a new interpreter per index, so the
heap it reports holds that index alone). Prints one JSON object. The heap figure is ``RssAnon`` from
``/proc/self/status`` after loading and answering every query, minus ``RssAnon`` in the same process after its
imports and before loading: anonymous memory only, so memory-mapped files (the page cache) are not counted.

Spec keys: ``how`` ("api": ``EmbeddingIndex.load``; "module": a folder of ``index-0.faiss`` + ``embeddings-0.npy``
from :mod:`crossmetric.retrieval.ivfpq`; "faiss": a plain faiss file, e.g. autofaiss'), ``path``, ``queries``,
``truth`` (.npy files), ``k``, ``batch``, and optional ``nprobe``, ``refine``, ``faiss_params`` (a
``ParameterSpace`` string such as autofaiss' ``"nprobe=32,efSearch=64,ht=2048"``), ``sweep`` (lists ``nprobe`` and
``refine``: also measure recall and ms/query over that grid, after the heap figure is taken).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(t[:k].tolist())) / k for f, t in zip(found, truth)]))


def loader(spec: dict):
    """A function ``search(queries, k, **overrides) -> rows`` over the loaded index."""
    import faiss

    faiss.omp_set_num_threads(1)
    if spec["how"] == "api":
        from crossmetric.retrieval.index import EmbeddingIndex

        index = EmbeddingIndex.load(spec["path"])
        params = {key: spec[key] for key in ("nprobe", "refine") if spec.get(key)}

        def search(q, k, nprobe=None, refine=None):
            extra = dict(params)
            if nprobe:
                extra["nprobe"] = nprobe
            if refine:
                extra["refine"] = refine
            return index.search_arrays(q, k, **extra)[1]

        return search, index
    if spec["how"] == "module":
        from crossmetric.retrieval.ivfpq import read_ondisk, search_refined

        index = read_ondisk(os.path.join(spec["path"], "index-0.faiss"))
        embeddings = np.load(os.path.join(spec["path"], "embeddings-0.npy"), mmap_mode="r")

        def search(q, k, nprobe=None, refine=None):
            params = faiss.SearchParametersIVF(nprobe=int(nprobe or spec["nprobe"]))
            return search_refined(index, embeddings, q, k, refine=int(refine or spec["refine"]), params=params)[1]

        return search, index
    index = faiss.read_index(spec["path"], faiss.IO_FLAG_MMAP if spec.get("io_flags") == "mmap" else 0)
    if spec.get("faiss_params"):
        faiss.ParameterSpace().set_index_parameters(index, spec["faiss_params"])

    def search(q, k, nprobe=None, refine=None):
        return index.search(q, k)[1]

    return search, index


def main(path: str) -> None:
    with open(path, encoding="utf-8") as handle:
        spec = json.load(handle)
    queries = np.ascontiguousarray(np.load(spec["queries"]), dtype=np.float32)
    truth = np.load(spec["truth"])
    k, batch = int(spec.get("k", 10)), int(spec.get("batch", 64))
    import faiss  # noqa: F401 - imported before the baseline, like the package's own imports

    if spec["how"] == "api":
        import crossmetric.retrieval.index  # noqa: F401
    if spec["how"] == "module":
        import crossmetric.retrieval.ivfpq  # noqa: F401
    before = {"RssAnon": status_kib("RssAnon"), "RssFile": status_kib("RssFile")}
    start = time.perf_counter()
    search, index = loader(spec)
    load_s = time.perf_counter() - start
    latencies, found = [], []
    for row in range(len(queries)):
        t0 = time.perf_counter()
        found.append(search(queries[row : row + 1], k)[0])
        latencies.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    for first in range(0, len(queries), batch):
        search(queries[first : first + batch], k)
    batch_s = time.perf_counter() - t0
    after = {"RssAnon": status_kib("RssAnon"), "RssFile": status_kib("RssFile"), "VmHWM": status_kib("VmHWM")}
    result = {
        "load_s": round(load_s, 3),
        "rss_anon_before_kib": before["RssAnon"],
        "rss_anon_after_kib": after["RssAnon"],
        "heap_bytes": (after["RssAnon"] - before["RssAnon"]) * 1024,
        "rss_file_after_kib": after["RssFile"],
        "vm_hwm_kib": after["VmHWM"],
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "mean_ms": float(np.mean(latencies)),
        f"qps_batch{batch}": len(queries) / batch_s,
        "recall_at_10": recall_at_k(np.array(found), truth),
        "queries": len(queries),
    }
    if spec.get("sweep"):
        rows = []
        for refine in spec["sweep"]["refine"]:
            for nprobe in spec["sweep"]["nprobe"]:
                t0 = time.perf_counter()
                got = np.concatenate(
                    [search(queries[f : f + batch], k, nprobe, refine) for f in range(0, len(queries), batch)]
                )
                ms = (time.perf_counter() - t0) * 1000 / len(queries)
                rows.append({"refine": refine, "nprobe": nprobe, "recall_at_10": recall_at_k(got, truth), "ms": ms})
        result["sweep"] = rows
    print(json.dumps(result))
    del index


if __name__ == "__main__":
    main(sys.argv[1])
