"""Index kinds at 10^6 and 10^7 items: build time, disk and heap per item, latency, throughput and recall@10.

Data: clustered unit vectors (``--dim`` 128): ``count / 1000`` Gaussian blobs (centres ~ N(0, I), spread 1.0, as
``benchmark_ann.py``'s clustered set), generated in chunks into a memory-mapped ``base.npy`` under ``--work``; 1,000
queries and 256 calibration queries from the same blobs, not in the index; exact top-10 by chunked brute force.

For each kind asked (``--kinds``), the index is built (timed, one thread), then loaded in a fresh process
(``_index_scale_measure.py``) that answers the 1,000 queries one at a time (p50/p99 ms, recall@10) and in batches
of 64 (queries/s), and reports its heap: ``RssAnon`` after minus before loading (memory-mapped files excluded).

- ``exact``, ``ivf``, ``hnsw``, ``ivfpq``: the public ``IndexBuilder`` fed 2^18 rows at a time, ids and all;
- ``ivfpq`` with ``--via module``: :mod:`crossmetric.retrieval.ivfpq` alone (no ids or metadata: sizing rule,
  training, on-disk lists, float16 re-scoring, ``nprobe`` calibrated on the 256 calibration queries by doubling
  until recall@10 ≥ 0.95); ``--sweep`` adds recall and ms/query over nprobe × refine (how DEFAULT_REFINE was set);
- ``autofaiss``, ``autofaiss_mmap``: autofaiss' ``build_index`` with the same ``--max_memory``, run by
  ``_index_scale_autofaiss.py`` in ``--autofaiss_python`` (a venv with autofaiss; not a dependency), searched with
  the parameters it chose (``_mmap``: ``should_be_memory_mappable=True``, read with ``IO_FLAG_MMAP``).

Writes ``{count}_{kind}.json`` per index and ``results.md`` (all JSON files in ``--out``) to ``--out``:
    nice -n 10 python scripts/benchmark_index_scale.py --count 1000000 --kinds ivfpq autofaiss exact
    nice -n 10 python scripts/benchmark_index_scale.py --count 10000000 --kinds ivfpq
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
CHUNK = 1 << 18
SPREAD = 1.0
TARGET_RECALL = 0.95


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def blobs(count: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0]).standard_normal((max(1, count // 1000), dim))


def draw(centres: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    x = centres[rng.integers(0, len(centres), n)] + SPREAD * rng.standard_normal((n, centres.shape[1]))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(work: Path, count: int, dim: int, seed: int, k: int) -> None:
    """base.npy, queries.npy, calibration.npy and their exact top-k (truth*.npy), unless already there."""
    if (work / "data.json").exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    centres = blobs(count, dim, seed)
    if not (work / "base.done").exists():
        base = np.lib.format.open_memmap(work / "base.npy", "w+", np.float32, (count, dim))
        for chunk, first in enumerate(tqdm(range(0, count, CHUNK), desc="data", mininterval=30)):
            rng = np.random.default_rng([seed, 1, chunk])
            base[first : first + CHUNK] = draw(centres, min(CHUNK, count - first), rng)
        base.flush()
        del base
        (work / "base.done").touch()
    base = np.load(work / "base.npy", mmap_mode="r")
    sets = {"queries": draw(centres, 1000, np.random.default_rng([seed, 2])),
            "calibration": draw(centres, 256, np.random.default_rng([seed, 3]))}  # fmt: skip
    both = np.concatenate(list(sets.values()))
    best_s = np.full((len(both), k), -np.inf, np.float32)
    best_i = np.full((len(both), k), -1, np.int64)
    for first in tqdm(range(0, count, CHUNK), desc="exact top-k", mininterval=30):
        scores, rows = faiss.knn(both, np.ascontiguousarray(base[first : first + CHUNK]), k, faiss.METRIC_INNER_PRODUCT)
        s = np.concatenate([best_s, scores], 1)
        i = np.concatenate([best_i, rows + first], 1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    np.save(work / "queries.npy", sets["queries"])
    np.save(work / "calibration.npy", sets["calibration"])
    np.save(work / "truth.npy", best_i[:1000])
    np.save(work / "truth_calibration.npy", best_i[1000:])
    (work / "data.json").write_text(json.dumps({"count": count, "dim": dim, "seed": seed, "spread": SPREAD}))


def chunks(base: np.ndarray):
    for first in range(0, len(base), CHUNK):
        yield np.asarray(base[first : first + CHUNK]), np.arange(first, min(first + CHUNK, len(base)), dtype=np.int64)


def build_ivfpq_module(work: Path, folder: Path, max_memory: str, refine: int) -> dict:
    from crossmetric.retrieval.ivfpq import ivfpq_layout, search_refined, train_ivf, training_sample_size, write_ondisk

    base = np.load(work / "base.npy", mmap_mode="r")
    count, dim = base.shape
    layout = ivfpq_layout(count, dim, max_memory)
    times = {}
    t0 = time.perf_counter()
    rows = np.sort(np.random.default_rng(0).choice(count, training_sample_size(layout, count), replace=False))
    trained = train_ivf(base[rows], layout)
    times["train_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    write_ondisk(trained, chunks(base), folder, "index-0", progress=True)
    times["encode_merge_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    f16 = np.lib.format.open_memmap(folder / "embeddings-0.npy", "w+", np.float16, (count, dim))
    for first in range(0, count, CHUNK):
        f16[first : first + CHUNK] = base[first : first + CHUNK]
    f16.flush()
    times["float16_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    index = faiss.read_index(str(folder / "index-0.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    calibration, truth = np.load(work / "calibration.npy"), np.load(work / "truth_calibration.npy")
    nprobe, recall = 1, 0.0
    while True:
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        found = search_refined(index, f16, calibration, 10, refine=refine, params=params)[1]
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
        if recall >= TARGET_RECALL or nprobe >= layout.nlist:
            break
        nprobe = min(2 * nprobe, layout.nlist)
    times["calibration_s"] = time.perf_counter() - t1
    build = {"layout": asdict(layout), "nprobe": nprobe, "refine": refine, "calibration_recall": recall} | times
    (folder / "params.json").write_text(json.dumps(build, indent=1))
    return build


def build_api(work: Path, folder: Path, kind: str, max_memory: str) -> dict:
    """The public builder: ``IndexBuilder`` fed chunk by chunk (ids are the row numbers as strings)."""
    from crossmetric.retrieval.builder import IndexBuilder
    from crossmetric.retrieval.index import EmbeddingIndex

    base = np.load(work / "base.npy", mmap_mode="r")
    options = {"max_memory": max_memory} if kind == "ivfpq" else {}
    with IndexBuilder(folder, kind=kind, progress=True, **options) as builder:
        for vectors, rows in chunks(base):
            builder.append(vectors, [str(row) for row in rows.tolist()])
        index = EmbeddingIndex.load(builder.finish())
    record = {"params": index.params, "calibration": index.calibration}
    del index
    return record


def build_autofaiss(work: Path, folder: Path, max_memory: str, mmap: bool, python: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    embeddings = folder / "embeddings"
    embeddings.mkdir(exist_ok=True)
    if not (embeddings / "base.npy").exists():
        os.symlink(work / "base.npy", embeddings / "base.npy")
    command = [python, str(HERE / "_index_scale_autofaiss.py"), str(embeddings), str(folder), max_memory]
    done = subprocess.run(command + (["--mmap"] if mmap else []), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"autofaiss failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(work: Path, spec: dict) -> dict:
    spec = {"queries": str(work / "queries.npy"), "truth": str(work / "truth.npy"), "k": 10, "batch": 64} | spec
    path = work / f"measure-{os.getpid()}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(HERE / "_index_scale_measure.py"), str(path)], capture_output=True,
                          text=True, env=env)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"measuring {spec['path']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def disk_bytes(path: Path) -> dict[str, int]:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    return {str(p.relative_to(path)) if p != path else p.name: p.stat().st_size for p in files}


def run_kind(args: argparse.Namespace, work: Path, kind: str) -> dict:
    count = args.count
    folder = work / f"index-{kind}"
    log(f"{kind}: building in {folder}")
    t0 = time.perf_counter()
    if kind == "ivfpq" and args.via == "module":
        build = build_ivfpq_module(work, folder, args.max_memory, args.refine)
        spec = {"how": "module", "path": str(folder), "nprobe": build["nprobe"], "refine": args.refine}
        if args.sweep:
            spec["sweep"] = {"nprobe": [2**i for i in range(0, 9)], "refine": [1, 2, 5, 10, 20, 50]}
    elif kind.startswith("autofaiss"):
        build = build_autofaiss(work, folder, args.max_memory, kind.endswith("mmap"), args.autofaiss_python)
        spec = {"how": "faiss", "path": build["index_path"], "faiss_params": build["index_param"],
                "io_flags": "mmap" if kind.endswith("mmap") else None}  # fmt: skip
    else:
        build = build_api(work, folder, kind, args.max_memory)
        spec = {"how": "api", "path": str(folder)}
    build_s = time.perf_counter() - t0
    log(f"{kind}: built in {build_s:.0f} s; measuring in a fresh process")
    measured = measure(work, spec)
    files = disk_bytes(Path(spec["path"]) if spec["how"] == "faiss" else folder)
    result = {
        "kind": kind, "via": spec["how"], "count": count, "dim": args.dim, "max_memory": args.max_memory,
        "build_s": round(build_s, 1), "build": build,
        "disk_bytes": sum(files.values()), "disk_bytes_per_item": sum(files.values()) / count, "files": files,
        "heap_bytes_per_item": measured["heap_bytes"] / count, **measured,
        "threads": 1, "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg(), "faiss": faiss.__version__,
                                  "python": platform.python_version()},
    }  # fmt: skip
    return result


def describe(result: dict) -> str:
    build = result.get("build", {})
    if result["kind"].startswith("autofaiss"):
        return f"{build.get('index_key')} `{build.get('index_param')}`"
    params = (build.get("params") or {}) | result.get("search", {})
    if "layout" in build:
        params = build["layout"] | {"nprobe": build["nprobe"], "refine": build["refine"]}
    keys = ("factory", "nlist", "nprobe", "refine", "ef_search")
    return ", ".join(f"{key} {params[key]}" for key in keys if params.get(key) is not None)


def projection(results: list[dict], count: int = 10**9) -> list[str]:
    """Heap and disk of ivfpq at ``count`` items, from the largest measured ivfpq run (see the text it writes)."""
    from crossmetric.retrieval.ivfpq import ivfpq_layout

    runs = [r for r in results if r["kind"] == "ivfpq" and "failed" not in r]
    if not runs:
        return []
    run = max(runs, key=lambda r: (r["count"], r["via"] == "api"))
    n, dim = run["count"], run["dim"]
    measured = ivfpq_layout(n, dim, run["max_memory"])
    big_budget = "16G"
    big = ivfpq_layout(count, dim, big_budget)
    fixed_now, fixed_big = measured.fixed_bytes(dim), big.fixed_bytes(dim)
    heap_rest = max(0.0, run["heap_bytes"] - fixed_now) / n  # everything but the centroids etc., counted per item
    heap = fixed_big + heap_rest * count
    per_file = {name: size / n for name, size in run["files"].items() if not name.endswith((".faiss", ".json"))}
    lists_now = measured.code_bytes + 8
    disk = sum(per_file.values()) * count - (lists_now - big.code_bytes - 8) * count + fixed_big
    lines = [
        f"Projection to {count:.0e} items on one machine, from the {n:.0e} ivfpq run ({run['via']}):",
        "",
        f"- layout: `ivfpq_layout({count:.0e}, {dim}, '{big_budget}')` = `{big.factory}` (the 2G default cannot hold",
        f"  10^9 codes: the lists alone need {count * 12 / 1024**3:.0f} GiB at 4 bytes; {big_budget} gives"
        f" {big.code_bytes}-byte codes, {big.list_bytes(count) / 1024**3:.1f} GiB of lists, in the page cache);",
        f"- heap: fixed part {fixed_big / 1e6:.0f} MB (centroids {big.nlist} × {dim} × 4 B, codebooks, rotation, list "
        f"offsets) + the rest of the measured heap counted as per-item ({heap_rest:.2f} B/item, an upper bound) = "
        f"**{heap / 1024**3:.2f} GiB** ({heap / count:.2f} B/item);",
        f"- disk: {disk / 1e12:.2f} TB ({disk / count:.0f} B/item: "
        + ", ".join(f"{name} {size:.1f}" for name, size in per_file.items())
        + f" B/item at {n:.0e}, the lists shrunk to {big.code_bytes + 8} B/item).",
    ]
    return lines


def write_report(out: Path) -> None:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("[0-9]*_*.json"))]
    lines = [
        "# Index kinds at scale (`scripts/benchmark_index_scale.py`)",
        "",
        "Clustered unit vectors, d = 128, 1,000 held-out queries, exact top-10 by brute force. One thread; the machine",
        "has 2 cores shared with other jobs (load average in each JSON), so absolute times are pessimistic. Heap:",
        "`RssAnon` after loading in a fresh process and answering the 1,000 queries, minus `RssAnon` before loading.",
        "",
        "| items | kind | via | build s | disk B/item | heap B/item | RssAnon KiB before → after | p50 ms | p99 ms |"
        " q/s @64 | recall@10 | settings |",
        "| ---: | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in sorted(results, key=lambda r: (r["count"], r["kind"], r.get("via", ""))):
        if "failed" in r:
            lines.append(f"| {r['count']:.0e} | {r['kind']} | | failed (see the notes) | | | | | | | | |")
            continue
        lines.append(
            f"| {r['count']:.0e} | {r['kind']} | {r['via']} | {r['build_s']:.0f} | {r['disk_bytes_per_item']:.1f} | "
            f"{r['heap_bytes_per_item']:.2f} | {r['rss_anon_before_kib']:,} → {r['rss_anon_after_kib']:,} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['qps_batch64']:.0f} | {r['recall_at_10']:.3f} | "
            f"{describe(r)} |"
        )
    notes = [f"- {r['count']:.0e} {r['kind']}: {r.get('explanation') or r['build']['note']}" for r in results
             if r.get("explanation") or (r.get("build") or {}).get("note")]  # fmt: skip
    lines += ["", "Notes:", "", *notes] if notes else []
    paired = out / "paired_1e6_autofaiss_ivfpq.json"
    if paired.exists():
        runs = json.loads(paired.read_text())["runs"]
        header = "| index | p50 ms | p99 ms | mean ms | q/s @64 | recall@10 | load |"
        lines += ["", "10^6, autofaiss and ivfpq measured alternately in one window (fresh process each):", "",
                  header, "| --- |" + " ---: |" * 6]  # fmt: skip
        for run in runs:
            times = f"{run['p50_ms']:.2f} | {run['p99_ms']:.2f} | {run['mean_ms']:.2f}"
            rest = f"{run['qps_batch64']:.0f} | {run['recall_at_10']:.3f} | {run['load_avg_1min']:.1f}"
            lines.append(f"| {run['index']} | {times} | {rest} |")
    glyphs = out / "glyphs_index_build.json"
    if glyphs.exists():
        record = json.loads(glyphs.read_text())
        lines += [
            "",
            f"`crossmetric index build` on the glyph gallery ({record['gallery']}, model {record['model']}):",
            "",
        ]
        for row in record["rows"]:
            if "failed" in row:
                lines.append(f"- {row['processes']} process(es): failed: {row['failed'][-300:]!r}")
            else:
                speed = f"**{row['images_per_s']:.0f} images/s** (load average {row['load_avg'][0]:.1f})"
                lines.append(
                    f"- {row['processes']} process(es): {row['images']:,} images in {row['wall_s']:.0f} s, {speed}"
                )
    lines += ["", *projection(results)]
    sweeps = [r for r in results if r.get("sweep")]
    for r in sweeps:
        lines += ["", f"## nprobe × refine at {r['count']:.0e} (recall@10 / ms per query at batch 64)", ""]
        refines = sorted({row["refine"] for row in r["sweep"]})
        probes = sorted({row["nprobe"] for row in r["sweep"]})
        lines += ["| nprobe | " + " | ".join(f"refine {x}" for x in refines) + " |",
                  "| ---: |" + " ---: |" * len(refines)]  # fmt: skip
        cell = {(row["nprobe"], row["refine"]): row for row in r["sweep"]}
        for probe in probes:
            cells = [f"{cell[probe, x]['recall_at_10']:.3f} / {cell[probe, x]['ms']:.2f}" for x in refines]
            lines.append(f"| {probe} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def images_build(model: str, gallery: str, out: Path, work: Path) -> None:
    """images/s of ``crossmetric index build`` on ``gallery`` with 1 process and with 2 (``accelerate launch``), one
    thread each, shards of 2,000 images (fresh output folders: a rerun would reuse finished shards)."""
    from datasets import load_from_disk

    count = len(load_from_disk(gallery))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    build = ["index", "build", "--model", model, "--images", gallery, "--shard_size", "2000"]
    rows = []
    for processes in (1, 2):
        target = work / f"glyph-index-{processes}p-{os.getpid()}"
        if processes == 1:
            command = [sys.executable, "-m", "crossmetric.cli", *build, "--output_dir", str(target)]
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "-m", "crossmetric.cli", *build, "--output_dir", str(target)]  # fmt: skip
        log(f"index build, {processes} process(es): {' '.join(command)}")
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - start
        if done.returncode:
            rows.append({"processes": processes, "failed": done.stderr[-2000:]})
            continue
        rows.append({"processes": processes, "images": count, "wall_s": seconds, "images_per_s": count / seconds,
                     "load_avg": os.getloadavg()})  # fmt: skip
        log(f"{rows[-1]}")
    (out / "glyphs_index_build.json").write_text(
        json.dumps({"model": model, "gallery": gallery, "rows": rows}, indent=1)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="data and indexes (default /work/bench/<count>)")
    parser.add_argument("--out", type=Path, default=HERE / "benchmark_results" / "index_scale")
    parser.add_argument("--kinds", nargs="+", default=["ivfpq"])
    parser.add_argument(
        "--via", choices=["api", "module"], default="api", help="ivfpq through IndexBuilder or ivfpq.py"
    )
    parser.add_argument("--max_memory", default="2G")
    parser.add_argument("--refine", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="ivfpq: also sweep nprobe × refine (recall, ms/query)")
    parser.add_argument("--autofaiss_python", default="/work/bench/afenv/bin/python")
    parser.add_argument("--report", action="store_true", help="only rewrite results.md from the JSON files in --out")
    parser.add_argument("--images_build", nargs=2, metavar=("MODEL", "GALLERY"), help="only time `index build`")
    args = parser.parse_args(argv)
    if args.images_build:
        images_build(*args.images_build, args.out, args.work or Path("/work/bench"))
        args.report = True
    if args.report:
        write_report(args.out)
        return 0
    faiss.omp_set_num_threads(1)
    work = args.work or Path("/work/bench") / str(args.count)
    log(f"data: {args.count} × {args.dim} in {work}")
    make_data(work, args.count, args.dim, args.seed, 10)
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.kinds:
        try:
            result = run_kind(args, work, kind)
        except Exception as error:  # one kind failing (e.g. autofaiss offline) must not lose the others
            log(f"{kind}: FAILED: {error}")
            result = {"kind": kind, "count": args.count, "failed": str(error)[-2000:]}
        suffix = "_module" if kind == "ivfpq" and args.via == "module" else ""
        (args.out / f"{args.count}_{kind}{suffix}.json").write_text(json.dumps(result, indent=1, default=str))
        log(f"{kind}: {json.dumps({k: v for k, v in result.items() if k not in ('build', 'files', 'sweep')})}")
        write_report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
