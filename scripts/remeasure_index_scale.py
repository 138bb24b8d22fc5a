"""Re-measure indexes that ``benchmark_index_scale.py`` already built, without building them again.

Search-time changes (a faster query path, another default) change p50, p99, queries/s and heap, not the build. This
loads each ``{count}_{kind}.json`` named, measures its index again in fresh processes (``_index_scale_measure.py``,
one thread), ``--rounds`` times, alternating the kinds round by round so that each sees the same machine, and
rewrites the JSON's measured fields with the round of median p50 (every round is kept under ``remeasured``).
``--pair`` also writes ``paired_1e6_autofaiss_ivfpq.json`` from the rounds (the alternating table of results.md).

    python scripts/remeasure_index_scale.py --count 10000000 --kinds ivfpq --rounds 3
    python scripts/remeasure_index_scale.py --count 1000000 --kinds autofaiss ivfpq --rounds 3 --pair
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_index_scale import HERE, log, measure, write_report  # noqa: E402

MEASURED = ("load_s", "rss_anon_before_kib", "rss_anon_after_kib", "heap_bytes", "rss_file_after_kib", "vm_hwm_kib",
            "p50_ms", "p99_ms", "mean_ms", "qps_batch64", "recall_at_10", "queries")  # fmt: skip


def spec_of(result: dict, work: Path) -> dict:
    """The measuring spec ``benchmark_index_scale.run_kind`` gave this result's index."""
    if result["via"] == "faiss":
        build = result["build"]
        return {"how": "faiss", "path": build["index_path"], "faiss_params": build["index_param"],
                "io_flags": "mmap" if result["kind"].endswith("mmap") else None}  # fmt: skip
    if result["via"] == "module":
        build = result["build"]
        return {"how": "module", "path": str(work / f"index-{result['kind']}"), "nprobe": build["nprobe"],
                "refine": build["refine"]}  # fmt: skip
    return {"how": "api", "path": str(work / f"index-{result['kind']}")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=None, help="data and indexes (default /work/bench/<count>)")
    parser.add_argument("--out", type=Path, default=HERE / "benchmark_results" / "index_scale")
    parser.add_argument("--kinds", nargs="+", default=["ivfpq"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pair", action="store_true", help="also write paired_1e6_autofaiss_ivfpq.json")
    args = parser.parse_args(argv)
    work = args.work or Path("/work/bench") / str(args.count)
    paths = {kind: args.out / f"{args.count}_{kind}.json" for kind in args.kinds}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        parser.error(f"no earlier result to re-measure: {', '.join(missing)} (run benchmark_index_scale.py first)")
    results = {kind: json.loads(path.read_text()) for kind, path in paths.items()}
    rounds: dict[str, list[dict]] = {kind: [] for kind in args.kinds}
    started = time.strftime("%H:%M", time.gmtime())
    for number in range(args.rounds):
        for kind in args.kinds:
            measured = measure(work, spec_of(results[kind], work))
            measured["load_avg_1min"] = round(os.getloadavg()[0], 2)
            rounds[kind].append(measured)
            log(f"round {number + 1} {kind}: p50 {measured['p50_ms']:.2f} ms, recall {measured['recall_at_10']:.3f}")
    for kind, result in results.items():
        median = statistics.median_low(r["p50_ms"] for r in rounds[kind])
        chosen = next(r for r in rounds[kind] if r["p50_ms"] == median)
        result.update({key: chosen[key] for key in MEASURED})
        result["heap_bytes_per_item"] = chosen["heap_bytes"] / result["count"]
        result["remeasured"] = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds[kind],
                                "chosen": "the round of median p50"}  # fmt: skip
        paths[kind].write_text(json.dumps(result, indent=1, default=str))
    if args.pair:
        names = {kind: ("autofaiss " + results[kind]["build"]["index_key"] if kind.startswith("autofaiss")
                        else f"{kind} defaults") for kind in args.kinds}  # fmt: skip
        runs = [{"index": names[kind], **rounds[kind][n]} for n in range(args.rounds) for kind in args.kinds]
        note = (f"fresh-process measurements alternated {', '.join(args.kinds)}, ... in one window ({started}-"
                f"{time.strftime('%H:%M', time.gmtime())} UTC), same 1,000 queries, one thread")  # fmt: skip
        (args.out / "paired_1e6_autofaiss_ivfpq.json").write_text(json.dumps({"note": note, "runs": runs}, indent=1))
    write_report(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
