"""Retrieve, then re-rank, on the benchmark's own runs: the embedding, the learned re-ranker, and a training-free one.

For each (row, seed) of a ``scripts/benchmark.py`` output folder whose run has a re-ranker (``RUN/reranker``, its
fusion chosen on the validation split), the run is exported as a user would (``crossmetric export --checkpoint RUN``:
the selected embedder and ``reranker/``), then ``crossmetric evaluate --model RUN/model --rerank_top_k K`` measures on
the unseen test classes: Recall@1 of the embedding, re-ranked by the fused score, by the head alone, and by DIML's
parameter-free structural similarity on the same tokens (the control), the ceiling Recall@K and the time per query.
Writes ``rerank_results.json`` and ``rerank_results.md`` (mean ± std over seeds; differences paired per seed, mean ±
standard error), next to ``results.json``.

    python scripts/benchmark_rerank_gains.py --output_dir outputs/benchmark --dataset emoji --rows cia_detach
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark import mean_std, paired, write_results  # noqa: E402

FIGURES = {
    "embedding": "recall@1",
    "fused": "rerank/recall@1",
    "head only": "rerank/recall@1_head_only",
    "training-free (DIML)": "rerank/recall@1_training_free",
    "ceiling R@K": "rerank/recall@k_ceiling",
}
DIFFERENCES = (
    ("fused − embedding", "fused", "embedding"),
    ("head only − embedding", "head only", "embedding"),
    ("training-free − embedding", "training-free (DIML)", "embedding"),
    ("fused − training-free", "fused", "training-free (DIML)"),
    ("head only − training-free", "head only", "training-free (DIML)"),
)


def crossmetric(*arguments: str, log: Path) -> None:
    command = [sys.executable, "-m", "crossmetric.cli", *arguments]
    with open(log, "w") as stream:
        result = subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=os.environ.copy())
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(arguments[:1])} failed (exit {result.returncode}); see {log}")


def evaluate_run(run: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Export ``run`` (when not yet exported with a re-ranker) and evaluate it with re-ranking; its metrics.json."""
    report = run / f"rerank_eval_top{args.rerank_top_k}"
    if (report / "metrics.json").is_file() and not args.rerun:
        return json.loads((report / "metrics.json").read_text())
    export = run / "model"
    if not (export / "reranker").is_dir():
        crossmetric("export", "--checkpoint", str(run), "--output_dir", str(export), log=run / "export.log")
    crossmetric(
        "evaluate", "--model", str(export), "--dataset", args.dataset, "--rerank_top_k", str(args.rerank_top_k),
        "--baselines", "--output_dir", str(report), "--no-progress", log=run / "rerank_eval.log",
    )  # fmt: skip
    return json.loads((report / "metrics.json").read_text())


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"Re-ranking the {results['rerank_top_k']} nearest on the test split ({results['dataset']}), seeds "
        f"{results['seeds']}; Recall@1 in points, mean ± std over seeds:",
        "",
        "| row | " + " | ".join(FIGURES) + " | alpha per seed | ms per query |",
        "|" + " --- |" * (len(FIGURES) + 3),
    ]
    for row, data in results["rows"].items():
        cells = [f"{data[name]['mean'] * 100:.2f} ± {data[name]['std'] * 100:.2f}" for name in FIGURES]
        alphas = ", ".join(f"{a:g}" + ("" if r else " (off)") for a, r in zip(data["alpha"], data["reranks"]))
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {alphas} | {data['ms_per_query']:.2f} |")
    lines += [
        "",
        "Paired per seed (points), mean ± standard error:",
        "",
        "| row | difference | mean ± s.e. | per seed |",
    ]
    lines.append("| --- | --- | --- | --- |")
    for row, data in results["rows"].items():
        for label, diff in data["paired"].items():
            per_seed = ", ".join(f"{d * 100:+.1f}" for d in diff["differences"])
            lines.append(
                f"| {row} | {label} | {diff['mean'] * 100:+.2f} ± {diff['standard_error'] * 100:.2f} | {per_seed} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True, help="a scripts/benchmark.py output folder")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--rows", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rerank_top_k", type=int, default=20)
    parser.add_argument("--rerun", action="store_true")
    args = parser.parse_args()
    rows: dict[str, Any] = {}
    for row in args.rows:
        per_seed = []
        for seed in args.seeds:
            run = args.output_dir / "runs" / f"{row}-seed{seed}"
            if not (run / "reranker").is_dir():
                raise SystemExit(f"{run} has no re-ranker (RUN/reranker): was it trained with the head?")
            per_seed.append(evaluate_run(run, args))
            print(f"{row} seed {seed}: " + ", ".join(f"{n} {per_seed[-1][k]:.4f}" for n, k in FIGURES.items()))
        values = {name: [m[key] for m in per_seed] for name, key in FIGURES.items()}
        rows[row] = {name: dict(zip(("mean", "std"), mean_std(v)), values=v) for name, v in values.items()}
        rows[row]["alpha"] = [m.get("rerank/alpha") for m in per_seed]
        rows[row]["reranks"] = [bool(m.get("rerank/reranks")) for m in per_seed]
        rows[row]["ms_per_query"] = mean_std([m["rerank/ms_per_query"] for m in per_seed])[0]
        rows[row]["paired"] = {label: paired(values[a], values[b]) for label, a, b in DIFFERENCES}
    results = {"dataset": args.dataset, "seeds": args.seeds, "rerank_top_k": args.rerank_top_k, "rows": rows}
    write_results(args.output_dir, "rerank_results", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
