"""``crossmetric evaluate``: embed a dataset split with a model, write its retrieval metrics and a picture report.

    crossmetric evaluate --model DIR_OR_HUB_ID --dataset NAME_OR_PATH [--split test] [--output_dir DIR]
        [--baseline_model DIR] [--checkpoint RUN_OR_CHECKPOINT] [--num_queries 8] [--top_k 5] [--max_images N]
        [--ks 1 2 4 8] [--baselines raw_pixels zero_shot] [--rerank_top_k 20]

Writes ``OUTPUT_DIR/metrics.json`` (the metrics of ``--model``; ``baseline_metrics.json`` too with
``--baseline_model``), ``OUTPUT_DIR/baselines.json`` (the trivial baselines of :mod:`crossmetric.evaluation.baselines`,
raw pixels and the zero-shot backbone, and the reason of each one skipped, so a reader sees whether training helped)
and ``OUTPUT_DIR/report/`` (``recall_at_k.png`` with a curve per row, ``retrieval_grid.png``, with ``--checkpoint``
``attention_maps.png``, and ``report.md`` listing them with the metrics table). Every image of the split queries all
the others (leave-one-out, docs/design.md §5); a dataset with ``query`` and ``gallery`` splits (In-Shop) is evaluated
queries against gallery (:class:`~crossmetric.evaluation.evaluator.Evaluator`, as in training). Mistakes in the
arguments (missing model, unknown dataset, absent split) are reported
before anything is embedded or written, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluation.baselines import BASELINES
from ..evaluation.evaluator import Embedded, Evaluator
from ..evaluation.rerank_metrics import rerank_report_line, rerank_summary
from ..evaluation.reranking import RerankSource, add_rerank_argument, evaluate_reranking, rerank_source
from ..inference.loading import load_embedder, load_training_checkpoint, resolve_model
from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning, CrossMetricModel
from ..utils.atomic_files import write_atomic
from .arguments import add_device_argument, add_progress_argument, parse_and_run, report_error
from .logging_setup import add_log_level_argument


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``crossmetric evaluate``."""
    parser.add_argument(
        "--model", required=True, help="exported model folder, training run folder, checkpoint, or Hub id"
    )
    parser.add_argument("--dataset", required=True, help="glyphs, cub200, cars196, sop, inshop, image folder, ...")
    parser.add_argument("--data_dir", default=None, help="local copy of a standard benchmark")
    parser.add_argument("--split", default="test", help="split to evaluate (In-Shop: query vs gallery)")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--split_strategy", default="official", choices=("official", "sorted", "shuffle"))
    parser.add_argument(
        "--output_dir",
        type=Path,
        default=None,
        help="the folder to write metrics.json and report/ to (default: evaluations/MODEL-DATASET-SPLIT)",
    )
    parser.add_argument("--batch_size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--baseline_model", default=None, help="a second model to compare on the same split")
    parser.add_argument(
        "--checkpoint", default=None, help="training run or checkpoint (with its head) for attention_maps.png"
    )
    parser.add_argument("--num_queries", type=int, default=8, help="queries shown in retrieval_grid.png")
    parser.add_argument("--top_k", type=int, default=5, help="neighbours shown per query")
    parser.add_argument("--attention_pairs", type=int, default=3, help="positive and negative pairs in the maps")
    parser.add_argument("--max_images", type=int, default=None, help="evaluate the first N images of the split")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="K of Recall@K (default 1 2 4 8)")
    parser.add_argument(
        "--baselines",
        nargs="*",
        choices=BASELINES,
        default=list(BASELINES),
        help="trivial baselines shown next to the model: raw pixels and the untrained pretrained backbone "
        "(default: both; --baselines alone: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled queries, pairs and k-means")
    add_device_argument(parser)
    add_progress_argument(parser)
    add_rerank_argument(parser)
    return add_log_level_argument(parser)


# ------------------------------------------------------------------------------------------------- the plan
@dataclass
class EvaluationPlan:
    """Everything checked and loaded before any image is embedded."""

    embedder: CrossMetricModel
    baseline: CrossMetricModel | None
    training_model: CrossMetricForMetricLearning | None
    evaluator: Evaluator  # the evaluated split (leave-one-out) or In-Shop's query and gallery splits, and the K
    output_dir: Path
    rerank: RerankSource | None = None  # where --rerank_top_k's re-ranker comes from


def _default_output_dir(ns: argparse.Namespace) -> Path:
    def tag(text: str) -> str:
        return re.sub(r"[^\w.-]+", "_", Path(str(text).rstrip("/")).name) or "model"

    return Path("evaluations") / f"{tag(ns.model)}-{tag(ns.dataset)}-{tag(ns.split)}"


def prepare(ns: argparse.Namespace) -> EvaluationPlan:
    """Check every argument and load the dataset and models; raise ``ValueError``/``FileNotFoundError`` on a
    mistake, before anything is embedded or written."""
    from ..data.dml_dataset import load_dml_dataset, resolve_dataset_name

    for name in ("batch_size", "num_queries", "top_k"):
        if getattr(ns, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(ns, name)}.")
    if ns.attention_pairs < 1:
        raise ValueError(f"--attention_pairs must be >= 1, got {ns.attention_pairs}.")
    if ns.max_images is not None and ns.max_images < 2:
        raise ValueError(f"--max_images must be >= 2, got {ns.max_images}.")
    if ns.ks is not None and min(ns.ks) < 1:
        raise ValueError(f"--ks must be positive integers, got {ns.ks}.")
    output_dir = ns.output_dir if ns.output_dir is not None else _default_output_dir(ns)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {str(output_dir)!r} is a file.")
    resolve_model(ns.model)
    if ns.baseline_model:
        resolve_model(ns.baseline_model, "--baseline_model")
    if ns.checkpoint and not Path(ns.checkpoint).is_dir():
        raise ValueError(f"--checkpoint {ns.checkpoint!r}: no such folder (pass a training run or checkpoint).")
    rerank = rerank_source(ns)
    resolve_dataset_name(ns.dataset)
    dataset = load_dml_dataset(
        ns.dataset,
        data_dir=ns.data_dir,
        image_column=ns.image_column,
        label_column=ns.label_column,
        split_strategy=ns.split_strategy,
        seed=ns.seed,
    )
    options = {"ks": tuple(ns.ks) if ns.ks else None, "seed": ns.seed, "batch_size": ns.batch_size}
    evaluator = Evaluator.from_dataset(dataset, ns.split, max_images=ns.max_images, **options)
    training_model = None
    if ns.checkpoint:
        training_model = load_training_checkpoint(ns.checkpoint)
        if training_model.head is None:
            raise ValueError(
                f"--checkpoint {ns.checkpoint!r} was trained without the cross-image-attention head (cia_levels=0), "
                "so it has no attention to draw; pass a run trained with cia_levels > 0, or leave out --checkpoint."
            )
    embedder = load_embedder(ns.model)[0]
    baseline = load_embedder(ns.baseline_model, flag="--baseline_model")[0] if ns.baseline_model else None
    return EvaluationPlan(embedder, baseline, training_model, evaluator, output_dir, rerank)


# ------------------------------------------------------------------------------------------------- running
def _write_report(
    plan: EvaluationPlan,
    ns: argparse.Namespace,
    device: torch.device,
    rows: dict[str, Embedded],
    metrics: dict[str, dict[str, float]],
    skipped: dict[str, str],
    rerank: str | None = None,
) -> Path:
    """``report/``: the pictures and ``report.md`` of every row (model, baseline model, raw pixels, zero-shot)."""
    from ..evaluation.report_writer import ReportContent, write_evaluation_report

    evaluator = plan.evaluator
    details: dict[str, Any] = {
        "model": ns.model,
        "dataset": ns.dataset,
        "split": evaluator.name,
        "images": sum(len(s) for s in evaluator.splits),
        "classes": len(np.unique(np.concatenate([e[1] for e in rows["model"]]))),
    }
    if ns.baseline_model:
        details["baseline model"] = ns.baseline_model
    if ns.checkpoint:
        details["attention checkpoint"] = ns.checkpoint
    details.update({name: f"skipped: {why}" for name, why in skipped.items()})
    if rerank is not None:
        details[f"re-ranking the {ns.rerank_top_k} nearest (base → re-ranked)"] = rerank
    title = f"Recall@K on {Path(str(ns.dataset)).name} ({evaluator.name})"
    content = ReportContent(evaluator, rows, metrics, details, title)
    attention = (plan.training_model, ns.attention_pairs, device) if plan.training_model is not None else None
    return write_evaluation_report(
        plan.output_dir / "report",
        content,
        num_queries=ns.num_queries,
        top_k=ns.top_k,
        seed=ns.seed,
        attention=attention,
    )


def _print_metrics(metrics: dict[str, dict[str, float]]) -> None:
    """The metrics table: one column per row of the report (model, baseline model, raw pixels, zero-shot); the
    re-ranking figures of the model follow it as "base → re-ranked" (``rerank_summary``)."""
    widths = {name: max(8, len(name)) for name in metrics}
    print(f"{'metric':<12}" + "".join(f" {name:>{widths[name]}}" for name in metrics))
    for key in [key for key in next(iter(metrics.values())) if not key.startswith("rerank")]:
        values = "".join(f" {row.get(key, float('nan')):>{widths[name]}.4f}" for name, row in metrics.items())
        print(f"{key:<12}{values}")


def run_evaluate(ns: argparse.Namespace) -> int:
    """Run ``crossmetric evaluate``; 0 on success, 2 (with a message, nothing written) on a user mistake."""
    from ..evaluation.baselines import baseline_features

    try:
        plan = prepare(ns)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        return report_error("evaluate", error)
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    evaluator = plan.evaluator
    rerank = evaluate_reranking(plan.rerank, evaluator, plan.embedder, ns, device) if plan.rerank else None
    if rerank is not None and rerank.embedded is not None:  # the re-ranker's pass embedded the evaluated model
        rows = {"model": rerank.embedded}
    else:
        rows = {"model": evaluator.embed(plan.embedder.to(device), device, ns.progress)}
    if plan.baseline is not None:
        rows["baseline"] = evaluator.embed(plan.baseline.to(device), device, ns.progress)
    features, skipped = baseline_features(
        ns.baselines, ns.model, plan.embedder, batch_size=ns.batch_size, device=device, progress=ns.progress
    )
    rows.update({name: evaluator.embed_features(function) for name, function in features.items()})
    metrics = {name: evaluator.metrics(embedded) for name, embedded in rows.items()}
    if rerank is not None:  # the model's re-ranker re-scored each query's top K (evaluation/reranking.py)
        metrics["model"].update(rerank.metrics)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(plan.output_dir / "metrics.json", json.dumps(metrics["model"], indent=2))
    if "baseline" in metrics:
        write_atomic(plan.output_dir / "baseline_metrics.json", json.dumps(metrics["baseline"], indent=2))
    trivial = {name: metrics[name] for name in features}
    write_atomic(plan.output_dir / "baselines.json", json.dumps({**trivial, "skipped": skipped}, indent=2))
    line = rerank_report_line(rerank.metrics) if rerank is not None else None
    report = _write_report(plan, ns, device, rows, metrics, skipped, line)
    _print_metrics(metrics)
    if rerank is not None:
        print("\n".join(rerank_summary(rerank.metrics, rerank.what)))
    for name, why in skipped.items():
        print(f"{name}: skipped ({why})")
    print(f"metrics written to {plan.output_dir / 'metrics.json'}; report in {report}")
    return 0


def main(argv: Sequence[str]) -> int:
    """Parse ``argv`` and run ``crossmetric evaluate``."""
    description = (
        "Embed a dataset's test split with a model, compute retrieval metrics and write a report with pictures."
    )
    return parse_and_run(argv, add_evaluate_arguments, run_evaluate, "crossmetric evaluate", description)
