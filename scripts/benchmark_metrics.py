"""Time and peak memory of crossmetric's retrieval metrics next to pytorch-metric-learning's AccuracyCalculator.

Both compute Recall@1 (= precision_at_1), R-precision, MAP@R and NMI (faiss k-means, 20 iterations, same
seed) on the same L2-normalised clustered embeddings (default 60k × 512, 11k classes, SOP-like class
sizes), leave-one-out. Each method runs in a fresh subprocess so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which sees numpy, torch and faiss allocations alike,
unlike ``tracemalloc``) is its own. Writes a JSON file and prints the ratios crossmetric / PML
(target: <= 1.0 for both time and memory).

    python scripts/benchmark_metrics.py --out benchmark_metrics.json
    python scripts/benchmark_metrics.py --n 120000 --methods crossmetric   # memory check at full SOP size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METHODS = ("crossmetric", "pytorch_metric_learning")
KMEANS_SEED = 1234  # faiss' default seed, which AccuracyCalculator's FaissKMeans uses


def make_data(n: int, dim: int, num_classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian class centres plus noise, L2-normalised; every class has >= 1 item, sizes ~ 1 + Poisson."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)])
    rng.shuffle(labels)
    centres = rng.normal(size=(num_classes, dim)).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 8192):  # in blocks: float64 noise for all items at once would dominate memory
        block = labels[start : start + 8192]
        x[start : start + len(block)] = centres[block] + noise * rng.standard_normal((len(block), dim), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def worker(method: str, data_path: str, nmi: bool) -> dict:
    """Run one method on the saved data in this (fresh) process; report time and memory."""
    # Both libraries are imported in both workers, so that the memory they take at import time (crossmetric
    # pulls in transformers and timm through its package root) is the same baseline on both sides.
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    from crossmetric.evaluation.metrics import retrieval_metrics

    rss_imports = current_rss_mib()
    with np.load(data_path) as data:
        x, y = data["embeddings"], data["labels"]
    rss_before = current_rss_mib()
    start = time.perf_counter()
    if method == "crossmetric":
        out = retrieval_metrics(x, y, (1, 2, 4, 8), nmi=nmi, seed=KMEANS_SEED, progress=False)
        values = {"precision_at_1": out["recall@1"], "r_precision": out["r_precision"], "map@r": out["map@r"]}
        values["nmi"] = out.get("nmi")
    else:
        include = ("precision_at_1", "r_precision", "mean_average_precision_at_r") + (("NMI",) if nmi else ())
        calculator = AccuracyCalculator(include=include, k="max_bin_count", device=torch.device("cpu"))
        out = calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
        values = {
            "precision_at_1": out["precision_at_1"],
            "r_precision": out["r_precision"],
            "map@r": out["mean_average_precision_at_r"],
            "nmi": out.get("NMI"),
        }
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "rss_after_imports_mib": rss_imports,
        "rss_before_compute_mib": rss_before,
        "peak_increase_mib": peak_rss_mib() - rss_before,
        "metrics": values,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=60_000, help="number of embeddings")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=11_000)
    parser.add_argument("--noise", type=float, default=2.5, help="noise scale around unit-variance class centres")
    parser.add_argument("--repeats", type=int, default=1, help="fresh runs per method (alternating); min time kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-nmi", action="store_true", help="skip the k-means / NMI part on both sides")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("benchmark_metrics.json"))
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, not args.no_nmi)))
        return
    if not 1 <= args.classes <= args.n:
        parser.error("--classes must be between 1 and --n")

    x, y = make_data(args.n, args.dim, args.classes, args.noise, args.seed)
    sizes = np.bincount(y)
    results: dict = {
        "config": {**{k: v for k, v in vars(args).items() if k not in ("worker", "data", "out")}, "out": str(args.out)},
        "data": {"max_class_size": int(sizes.max()), "singleton_classes": int((sizes == 1).sum())},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        data_path = str(Path(tmp) / "data.npz")
        np.savez(data_path, embeddings=x, labels=y)
        del x, y
        runs: dict[str, list[dict]] = {method: [] for method in args.methods}
        for repeat in range(args.repeats):
            # Alternate the order so that neither method always runs on a warmer (or busier) machine.
            for method in args.methods if repeat % 2 == 0 else args.methods[::-1]:
                print(f"running {method} ({repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
                command = [sys.executable, __file__, "--worker", method, "--data", data_path]
                command += ["--no-nmi"] if args.no_nmi else []
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"{method} failed:\n{done.stderr[-4000:]}")
                runs[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"  {method}: {json.dumps(runs[method][-1])}", file=sys.stderr, flush=True)
        for method, method_runs in runs.items():
            results[method] = {**min(method_runs, key=lambda r: r["seconds"]), "all_runs": method_runs}
    if all(m in results for m in METHODS):
        ours, theirs = results["crossmetric"], results["pytorch_metric_learning"]
        results["ratio"] = {
            "time": ours["seconds"] / theirs["seconds"],
            "peak_rss": ours["peak_rss_mib"] / theirs["peak_rss_mib"],
            "peak_increase": ours["peak_increase_mib"] / theirs["peak_increase_mib"],
        }
    args.out.write_text(json.dumps(results, indent=2))
    for method in args.methods:
        r = results[method]
        print(
            f"{method:>24}: {r['seconds']:8.1f} s  peak RSS {r['peak_rss_mib']:8.0f} MiB "
            f"(+{r['peak_increase_mib']:.0f} MiB over {r['rss_before_compute_mib']:.0f} MiB before compute)  "
            + "  ".join(f"{k}={v:.6f}" for k, v in r["metrics"].items() if v is not None)
        )
    if "ratio" in results:
        ratio = results["ratio"]
        print(
            f"crossmetric / pytorch-metric-learning: time {ratio['time']:.3f}, peak RSS {ratio['peak_rss']:.3f}, "
            f"peak increase {ratio['peak_increase']:.3f}  (target <= 1.0)"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
