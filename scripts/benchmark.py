"""Does training help, and does cross-image attention beat its own baseline? Floors, trained rows, several seeds.

Every trained row is the recipe the dataset gets by default (``crossmetric train --dataset X``: same schedule,
sampler, augmentation and selection on a validation split of the training classes) with only the head settings
changed; the baseline is the head switched off (``--cia_levels 0``). Each (row, seed) is one ``crossmetric train``
process, so the figures are what a user gets from the CLI. Next to them, the floors every table shows: nearest
neighbours on raw pixels, and the starting model (zero-shot: ImageNet weights, whitened-PCA embedding layer) of each
seed. Writes ``results.json`` and ``results.md``: mean ± std over seeds on the unseen test classes, and paired
per-seed differences (row − baseline, row − zero-shot) with their mean ± standard error, plus the cost ratios
measured in the same run: training step time head on / head off, exported-model inference time CIA / baseline.

    python scripts/benchmark.py --output_dir outputs/benchmark            # glyphs, 3 seeds, all rows
    python scripts/benchmark.py --dataset path/to/imagefolder --rows baseline cia --seeds 0 1 2
    python scripts/benchmark.py --parallel 8 -- --num_workers 2            # on a GPU machine: 8 runs at once
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# Each row spells out its head settings, so that it keeps its meaning whatever the defaults are. HEAD_BEFORE is the
# head as it trained before issue 20 (its loss reaches the backbone, no transfer); LISTWISE the listwise transfer of
# issue 20's search (the head on detached tokens teaching the embedding its top-8 order); the default recipe is its
# top-16 row, ``cia_detach_distill_listwise_top16``, best on emoji's validation and test splits.
HEAD_BEFORE: dict[str, Any] = {"cia_levels": 2, "cia_detach": False, "cia_distill_weight": 0.0}
DETACHED: dict[str, Any] = {"cia_levels": 2, "cia_detach": True, "cia_distill_weight": 0.0}
LISTWISE: dict[str, Any] = {
    **DETACHED, "cia_distill_weight": 50.0, "cia_distill_form": "listwise", "cia_distill_temperature": 0.1,
    "cia_distill_top_k": 8, "cia_distill_warmup_steps": 60, "cia_distill_stop": "never",
}  # fmt: skip
# issue 29 item 7: the transfer stops where the head re-ranks validation no better than the embedding (the
# fine-tuning recipe's default since; the rows above keep running without it, as they were measured)
STOP_RULE: dict[str, Any] = {"cia_distill_stop": "head_no_better"}
# S2SD's defaults: a row-wise KL over the whole batch, T = 1, weight 50, no warm-up
S2SD_KL: dict[str, Any] = {
    "cia_distill_weight": 50.0, "cia_distill_form": "kl", "cia_distill_temperature": 1.0, "cia_distill_warmup_steps": 0,
}  # fmt: skip
ROWS: dict[str, dict[str, Any]] = {
    "baseline": {"cia_levels": 0, "cia_distill_weight": 0.0},
    "cia": HEAD_BEFORE,  # 2 levels, query from the other image, lambda 1, every level, gradient into the backbone
    "cia_levels_1": {**HEAD_BEFORE, "cia_levels": 1},
    "cia_levels_3": {**HEAD_BEFORE, "cia_levels": 3},
    "cia_query_self": {**HEAD_BEFORE, "cia_query": "self"},  # control: no conditioning (the query is the image's own)
    "cia_query_shuffled": {**HEAD_BEFORE, "cia_query": "shuffled"},  # control: a random third image, not the partner
    "cia_lambda_0.5": {**HEAD_BEFORE, "cia_loss_weight": 0.5},
    "cia_lambda_2": {**HEAD_BEFORE, "cia_loss_weight": 2.0},
    "cia_last_level_only": {**HEAD_BEFORE, "cia_level_weights": [0.0, 1.0]},
    # the head's token stage (the recipe's is stride 16: 4×4 at 64 px): stride 8 (8×8) and the last map (2×2)
    "cia_token_stride_8": {**HEAD_BEFORE, "cia_token_stride": 8},
    "cia_token_stride_last": {**HEAD_BEFORE, "cia_token_stride": 0},
    # issue 20, the transfer from the head to the embedding: a lighter head (lambda), the head on detached tokens
    # (its loss never reaches the embedder: a re-ranker), and the head's similarities taught to the embedding
    "cia_lambda_0.1": {**HEAD_BEFORE, "cia_loss_weight": 0.1},
    "cia_lambda_0.3": {**HEAD_BEFORE, "cia_loss_weight": 0.3},
    "cia_detach": DETACHED,
    "cia_stage": {**DETACHED, "cia_detach": False, "reranker_stage_steps": 150},  # the head after the embedder
    "cia_distill_kl": {**HEAD_BEFORE, **S2SD_KL},
    "cia_detach_distill_kl": {**DETACHED, **S2SD_KL},
    "cia_detach_distill_listwise": LISTWISE,
    "cia_detach_distill_margin": {
        **DETACHED,
        "cia_distill_weight": 10.0,
        "cia_distill_form": "margin_mse",
        "cia_distill_warmup_steps": 60,
    },  # fmt: skip
    # the controls with the listwise transfer: no conditioning, and a random third image
    "cia_query_self_detach_distill_listwise": {**LISTWISE, "cia_query": "self"},
    "cia_query_shuffled_detach_distill_listwise": {**LISTWISE, "cia_query": "shuffled"},
    "cia_lambda_0.1_distill_listwise": {**LISTWISE, "cia_detach": False, "cia_loss_weight": 0.1},
    # issue 20 item 3, one map for both: the head reads the last map, the one the embedding pools (2×2 at 64 px)
    "cia_detach_distill_listwise_shared_map": {**LISTWISE, "cia_token_stride": 0},
    # the listwise transfer's own settings (session 3): a heavier term, more candidates, a sharper softmax
    "cia_detach_distill_listwise_w100": {**LISTWISE, "cia_distill_weight": 100.0},
    "cia_detach_distill_listwise_top16": {**LISTWISE, "cia_distill_top_k": 16},
    "cia_detach_distill_listwise_t0.05": {**LISTWISE, "cia_distill_temperature": 0.05},
    # the controls with the top-16 transfer
    "cia_query_self_detach_distill_listwise_top16": {**LISTWISE, "cia_distill_top_k": 16, "cia_query": "self"},
    "cia_query_shuffled_detach_distill_listwise_top16": {**LISTWISE, "cia_distill_top_k": 16, "cia_query": "shuffled"},
    # issue 29: the default with the transfer's stop rule; the no-conditioning control at lambda 0.3 (run with
    # `-- --image_size 112` for the head's 7x7 tokens: every row gets the same extra arguments)
    "cia_detach_distill_listwise_top16_stop": {**LISTWISE, "cia_distill_top_k": 16, **STOP_RULE},
    "cia_query_self_lambda_0.3": {**HEAD_BEFORE, "cia_query": "self", "cia_loss_weight": 0.3},
    "cia_query_shuffled_lambda_0.3": {**HEAD_BEFORE, "cia_query": "shuffled", "cia_loss_weight": 0.3},
}
CONTROLS = ("cia_query_self", "cia_query_shuffled")  # conditioning is shown only where CIA beats both (§4)
METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "nmi")


def run_arguments(row: str, seed: int, args: argparse.Namespace, extra: list[str]) -> list[str]:
    overrides = {**ROWS[row], "seed": seed}
    command = [
        "--dataset",
        args.dataset,
        "--output_dir",
        str(args.output_dir / "runs"),
        "--run_name",
        f"{row}-seed{seed}",
        "--progress",
        "False",
        "--export",
        str(args.export_all or (seed == args.seeds[0] and row in ("baseline", args.head_row))),
    ]
    if args.data_dir:
        command += ["--data_dir", args.data_dir]
    for key, value in overrides.items():
        command += [f"--{key}", *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
    return command + extra


def train(row: str, seed: int, args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """One ``crossmetric train`` process; returns its summary.json (reused when it already exists)."""
    summary_path = args.output_dir / "runs" / f"{row}-seed{seed}" / "summary.json"
    if summary_path.exists() and not args.rerun:
        return json.loads(summary_path.read_text())
    if args.collect_only:
        raise SystemExit(f"--collect_only: {row} seed {seed} has no {summary_path}")
    log_path = args.output_dir / "logs" / f"{row}-seed{seed}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "crossmetric.cli", "train", *run_arguments(row, seed, args, extra)]
    from crossmetric.inference.run_folder import complete_checkpoints

    resuming = bool(complete_checkpoints(summary_path.parent))  # a run cut short (a session's end)
    if resuming:  # goes on from its last epoch, its log continued
        command += ["--resume_from_checkpoint", "latest"]
    started = time.perf_counter()
    with open(log_path, "a" if resuming else "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    if result.returncode != 0:
        raise RuntimeError(f"{row} seed {seed} failed (exit {result.returncode}); see {log_path}")
    summary = json.loads(summary_path.read_text())
    print(
        f"{row:22s} seed {seed}: recall@1 {summary['final']['recall@1']:.4f} ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return summary


def paired_metrics(row: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """:func:`paired` of Recall@1 and MAP@R: a row's per-seed values against a reference row's (or floor's)."""
    return {m: paired(row[m]["values"], reference[m]["values"]) for m in ("recall@1", "map@r")}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(values: list[float], reference: list[float]) -> dict[str, Any]:
    """Per-seed differences ``values - reference`` (same seed: same split, sampler and start), mean ± s.e."""
    differences = [v - r for v, r in zip(values, reference)]
    mean, std = mean_std(differences)
    return {"differences": differences, "mean": mean, "standard_error": std / max(1, len(differences)) ** 0.5}


def raw_pixel_metrics(dataset: str, data_dir: str | None) -> dict[str, float]:
    """The raw-pixel floor on the test split (64×64 RGB, centred, L2-normalised; seed-independent)."""
    from crossmetric.data.dml_dataset import load_dml_dataset
    from crossmetric.evaluation.evaluator import Evaluator, raw_pixel_features

    data = load_dml_dataset(dataset, data_dir=data_dir)
    return Evaluator.from_dataset(data, "test").evaluate_features(raw_pixel_features)


def inference_ratio(baseline_dir: Path, cia_dir: Path, repeats: int = 7) -> dict[str, float]:
    """Embedding time of the CIA export over the baseline export on the same batch, interleaved A/B."""
    import torch

    from crossmetric import CrossMetricModel

    models = [CrossMetricModel.from_pretrained(d).eval() for d in (baseline_dir, cia_dir)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = [m.to(device) for m in models]
    size = models[0].config.image_size
    batch = torch.randn(256, 3, size, size, device=device)
    times: list[list[float]] = [[], []]
    with torch.no_grad():
        for model in models:
            model(batch)  # warm-up
        for _ in range(repeats):
            for index, model in enumerate(models):
                if device == "cuda":
                    torch.cuda.synchronize()
                started = time.perf_counter()
                model(batch)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[index].append(time.perf_counter() - started)
    baseline, cia = statistics.median(times[0]), statistics.median(times[1])
    return {"baseline_seconds": baseline, "cia_seconds": cia, "ratio": cia / baseline}


def markdown(results: dict[str, Any]) -> str:
    header = "| row | " + " | ".join(METRICS) + " | step s | seeds |\n|" + " --- |" * (len(METRICS) + 3)
    lines = [header]
    raw = results["floors"]["raw_pixels"]
    lines.append("| raw pixels | " + " | ".join(f"{raw[m] * 100:.2f}" for m in METRICS) + " | – | – |")
    zero = results["floors"]["zero_shot"]
    cells = [f"{zero[m]['mean'] * 100:.2f} ± {zero[m]['std'] * 100:.2f}" for m in METRICS]
    lines.append("| zero-shot (starting model) | " + " | ".join(cells) + " | – | per seed |")
    for row, data in results["rows"].items():
        cells = [f"{data[m]['mean'] * 100:.2f} ± {data[m]['std'] * 100:.2f}" for m in METRICS]
        per_seed = ", ".join(f"{v * 100:.1f}" for v in data["recall@1"]["values"])
        step = data["median_step_seconds"]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {step:.3f} | R@1 per seed: {per_seed} |")
    lines.append("")
    lines.append("Paired per-seed differences (points), mean ± standard error:")
    lines.append("")
    lines.append(
        f"| row | metric | vs zero-shot | per seed | vs baseline | per seed | vs {results['head_row']} | per seed |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for row, data in results["rows"].items():
        for metric in ("recall@1", "map@r"):
            cells = []
            for versus in ("zero_shot", "baseline", results["head_row"]):
                diff = data["paired"].get(versus, {}).get(metric)
                cells += ["–", "–"] if diff is None else [
                    f"{diff['mean'] * 100:+.2f} ± {diff['standard_error'] * 100:.2f}",
                    ", ".join(f"{d * 100:+.1f}" for d in diff["differences"]),
                ]  # fmt: skip
            lines.append(f"| {row} | {metric} | " + " | ".join(cells) + " |")
    controls = results["rows"].get(results["head_row"], {}).get("paired", {}).get("controls", {})
    if controls:
        lines += ["", "CIA − each control (points), paired per seed, mean ± standard error:", ""]
        lines.append("| control | metric | CIA − control | per seed |\n| --- | --- | --- | --- |")
        for control, diffs in controls.items():
            for metric, diff in diffs.items():
                per_seed = ", ".join(f"{d * 100:+.1f}" for d in diff["differences"])
                lines.append(
                    f"| {control} | {metric} | {diff['mean'] * 100:+.2f} ± {diff['standard_error'] * 100:.2f} | "
                    f"{per_seed} |"
                )
    cost = results["cost"]
    lines.append("")
    if cost["step_time_ratio"] is not None:
        lines.append(
            f"Training step time, {results['head_row']} / head off: {cost['step_time_ratio']:.3f}. "
            f"Exported-model inference time, {results['head_row']} / baseline: {cost['inference']['ratio']:.3f}."
        )
    lines.append(f"Wall time: {results['wall_seconds'] / 60:.1f} min on {results['device']}.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="glyphs", help="glyphs, a benchmark name or an imagefolder path")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/benchmark"))
    parser.add_argument("--parallel", type=int, default=1, help="training processes at once")
    parser.add_argument("--collect_only", action="store_true", help="only tabulate runs that exist; train nothing")
    parser.add_argument("--rerun", action="store_true", help="train again even where a summary exists")
    parser.add_argument(
        "--export_all", action="store_true", help="export every run (RUN/model, with reranker/ where it has one)"
    )
    parser.add_argument("--head_row", default="cia", help="the head row that other rows and controls pair with")
    parser.add_argument(
        "--controls", nargs="*", default=list(CONTROLS), help="control rows to pair the head row against"
    )
    args, extra = parser.parse_known_args()
    extra = [e for e in extra if e != "--"]
    if "baseline" not in args.rows:
        parser.error("--rows must include 'baseline' (head off): every row is paired against it")
    head, controls = args.head_row, args.controls
    started = time.perf_counter()
    jobs = [(row, seed) for row in args.rows for seed in args.seeds]  # row by row: finished rows can be read early
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        summaries = dict(zip(jobs, pool.map(lambda job: train(*job, args, extra), jobs)))
    rows: dict[str, Any] = {}
    for row in args.rows:
        finals = [summaries[(row, seed)]["final"] for seed in args.seeds]
        rows[row] = {
            metric: dict(
                zip(("mean", "std"), mean_std([f[metric] for f in finals])), values=[f[metric] for f in finals]
            )
            for metric in METRICS
        }
        rows[row]["median_step_seconds"] = statistics.median(
            summaries[(row, seed)]["median_step_seconds"] for seed in args.seeds
        )
    starts = [summaries[("baseline", seed)]["zero_shot"] for seed in args.seeds]  # same seed: same starting model
    zero_shot = {m: dict(zip(("mean", "std"), mean_std([s[m] for s in starts])), values=[s[m] for s in starts])
                 for m in METRICS}  # fmt: skip
    for row in args.rows:
        rows[row]["paired"] = {
            versus: paired_metrics(rows[row], reference)
            for versus, reference in (("zero_shot", zero_shot), ("baseline", rows["baseline"]))
        }
        rows[row]["selected_steps"] = [summaries[(row, seed)]["best"]["step"] for seed in args.seeds]
    for row in args.rows:  # every head variant against the recipe's head, seed by seed
        if row not in ("baseline", head) and head in rows:
            rows[row]["paired"][head] = paired_metrics(rows[row], rows[head])
    if head in rows:
        rows[head]["paired"]["controls"] = {
            control: paired_metrics(rows[head], rows[control]) for control in controls if control in rows
        }
    runs = args.output_dir / "runs"
    inference = (
        inference_ratio(
            runs / f"baseline-seed{args.seeds[0]}" / "model", runs / f"{head}-seed{args.seeds[0]}" / "model"
        )
        if head in rows
        else None
    )
    import torch

    results = {
        "dataset": args.dataset,
        "seeds": args.seeds,
        "extra_arguments": extra,
        "recipe": summaries[("baseline", args.seeds[0])]["recipe"],
        "floors": {"raw_pixels": raw_pixel_metrics(args.dataset, args.data_dir), "zero_shot": zero_shot},
        "rows": rows,
        "cost": {
            "step_time_ratio": rows[head]["median_step_seconds"] / rows["baseline"]["median_step_seconds"]
            if head in rows
            else None,
            "inference": inference,
        },
        "head_row": head,
        "gain_recall@1": rows[head]["recall@1"]["mean"] - rows["baseline"]["recall@1"]["mean"]
        if head in rows
        else None,
        "wall_seconds": time.perf_counter() - started,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)",
        "command": " ".join(sys.argv),
    }
    write_results(args.output_dir, "results", results, markdown(results))
    return 0


def write_results(folder: Path, name: str, results: dict[str, Any], table: str) -> None:
    """``NAME.json`` and ``NAME.md`` in ``folder``, and the table on stdout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(results, indent=2))
    (folder / f"{name}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
