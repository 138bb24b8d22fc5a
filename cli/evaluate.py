"""``crossmetric evaluate``: embed a dataset split with a model, write its retrieval metrics and a picture report.

    crossmetric evaluate --model DIR_OR_HUB_ID --dataset NAME_OR_PATH [--split test] [--output_dir DIR]
        [--baseline_model DIR] [--checkpoint RUN_OR_CHECKPOINT] [--num_queries 8] [--top_k 5] [--max_images N]
        [--ks 1 2 4 8] [--rerank_top_k 20]

Writes ``OUTPUT_DIR/metrics.json`` (the metrics of ``--model``; ``baseline_metrics.json`` too with
``--baseline_model``) and ``OUTPUT_DIR/report/`` (``recall_at_k.png``, ``retrieval_grid.png``, with ``--checkpoint``
``attention_maps.png``, and ``report.md`` listing them with the metrics table). Every image of the split queries all
the others (leave-one-out, docs/design.md §4); a dataset with ``query`` and ``gallery`` splits (In-Shop) is evaluated
queries against gallery. Mistakes in the arguments (missing model, unknown dataset, absent split) are reported
before anything is embedded or written, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..evaluation.reranking import add_rerank_argument, rerank_metrics, rerank_source
from ..hub.model_loading import load_embedder, load_training_checkpoint, resolve_model
from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning, CrossMetricModel
from ..utils.atomic_files import staged_directory, write_atomic
from .logging_setup import add_log_level_argument, progress_default

LEAVE_ONE_OUT_KS = (1, 2, 4, 8)
QUERY_GALLERY_KS = (1, 10, 20, 30, 40, 50)  # the In-Shop protocol's K
Embedded = list[tuple[np.ndarray, np.ndarray]]  # (embeddings, labels) of one split, or of query and gallery


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
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled queries, pairs and k-means")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda when available)")
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=progress_default(),
        help="progress bars (default: on a terminal only)",
    )
    add_rerank_argument(parser)
    return add_log_level_argument(parser)


# ------------------------------------------------------------------------------------------------- the plan
@dataclass
class EvaluationPlan:
    """Everything checked and loaded before any image is embedded."""

    embedder: CrossMetricModel
    baseline: CrossMetricModel | None
    training_model: CrossMetricForMetricLearning | None
    queries: Any  # datasets.Dataset: the evaluated split, or In-Shop's query split
    gallery: Any | None  # In-Shop's gallery split; None for leave-one-out
    ks: tuple[int, ...]
    output_dir: Path
    split_name: str


def _select_splits(dataset: Any, split: str, max_images: int | None) -> tuple[Any, Any | None, str]:
    if split not in dataset and split == "test" and {"query", "gallery"} <= set(dataset):
        queries, gallery, name = dataset["query"], dataset["gallery"], "query vs gallery"
    elif split in dataset:
        queries, gallery, name = dataset[split], None, split
    else:
        raise ValueError(f"--split {split!r} is not a split of this dataset (it has {list(dataset)}).")
    if max_images is not None:
        queries = queries.select(range(min(max_images, len(queries))))
        gallery = gallery.select(range(min(max_images, len(gallery)))) if gallery is not None else None
    if gallery is None and len(queries) < 2:
        raise ValueError(f"split {name!r} has {len(queries)} image(s); leave-one-out retrieval needs at least 2.")
    return queries, gallery, name


def _default_output_dir(ns: argparse.Namespace) -> Path:
    def tag(text: str) -> str:
        return re.sub(r"[^\w.-]+", "_", Path(str(text).rstrip("/")).name) or "model"

    return Path("evaluations") / f"{tag(ns.model)}-{tag(ns.dataset)}-{tag(ns.split)}"


def prepare(ns: argparse.Namespace) -> EvaluationPlan:
    """Check every argument and load the dataset and models; raise ``ValueError``/``FileNotFoundError`` on a
    mistake, before anything is embedded or written."""
    from ..training.data.dml_dataset import load_dml_dataset, resolve_dataset_name

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
    rerank_source(ns)
    resolve_dataset_name(ns.dataset)
    dataset = load_dml_dataset(
        ns.dataset,
        data_dir=ns.data_dir,
        image_column=ns.image_column,
        label_column=ns.label_column,
        split_strategy=ns.split_strategy,
        seed=ns.seed,
    )
    queries, gallery, split_name = _select_splits(dataset, ns.split, ns.max_images)
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
    ks = tuple(ns.ks) if ns.ks else (LEAVE_ONE_OUT_KS if gallery is None else QUERY_GALLERY_KS)
    return EvaluationPlan(embedder, baseline, training_model, queries, gallery, ks, output_dir, split_name)


# ------------------------------------------------------------------------------------------------- running
def _embed(embedder: CrossMetricModel, plan: EvaluationPlan, ns: argparse.Namespace, device: torch.device) -> Embedded:
    """Embeddings and labels of the evaluated split, or of the query and the gallery split."""
    from ..evaluation.evaluator import embed_split

    embedder.to(device)
    splits = [plan.queries] if plan.gallery is None else [plan.queries, plan.gallery]
    return [embed_split(embedder, s, batch_size=ns.batch_size, device=device, progress=ns.progress) for s in splits]


def _metrics(embedded: Embedded, ks: tuple[int, ...], seed: int) -> dict[str, float]:
    from ..evaluation.metrics import query_gallery_metrics, retrieval_metrics

    if len(embedded) == 1:
        return retrieval_metrics(*embedded[0], ks=ks, seed=seed, progress=False)
    (q, ql), (g, gl) = embedded
    return query_gallery_metrics(q, ql, g, gl, ks=ks, nmi=True, seed=seed, progress=False)


def _curve(embedded: Embedded, max_k: int) -> list[float]:
    from ..evaluation.reports import recall_at_k_curve

    if len(embedded) == 1:
        return recall_at_k_curve(*embedded[0], max_k)
    (q, ql), (g, gl) = embedded
    return recall_at_k_curve(q, ql, max_k, g, gl)


def _retrieval_grid(plan: EvaluationPlan, embedded: Embedded, ns: argparse.Namespace, path: Path) -> None:
    """Sample queries (seeded) and draw them with their nearest neighbours, as the metrics found them."""
    from ..evaluation.reports import display_images, nearest_neighbours, plot_retrieval_grid, sample_queries

    (q, ql) = embedded[0]
    (g, gl), gallery = (embedded[1], plan.gallery) if len(embedded) == 2 else ((q, ql), plan.queries)
    chosen = sample_queries(ql, gl if len(embedded) == 2 else None, ns.num_queries, ns.seed)
    self_ids = chosen if len(embedded) == 1 else None
    neighbours, scores = nearest_neighbours(q[chosen], g, ns.top_k, self_ids=self_ids)
    names = plan.queries.features["label"].int2str
    plot_retrieval_grid(
        display_images(plan.queries, chosen),
        [names(int(ql[i])) for i in chosen],
        [display_images(gallery, row) for row in neighbours],
        [[names(int(gl[n])) for n in row] for row in neighbours],
        scores,
        path,
    )


def _attention_maps(plan: EvaluationPlan, ns: argparse.Namespace, device: torch.device, path: Path) -> None:
    """Attention maps of seeded positive and negative pairs of the evaluated images, from the checkpoint's head."""
    from datasets import Image as ImageFeature

    from ..evaluation.attention_maps import pair_attention, plot_attention_maps, select_pairs, unnormalise
    from ..training.data.image_loading import SkippedImages, load_rgb_image
    from ..training.data.transforms import build_transform

    model = plan.training_model
    pool = plan.gallery if plan.gallery is not None else plan.queries
    labels = np.asarray(pool.with_format("numpy")["label"])
    pairs = select_pairs(labels, ns.attention_pairs, ns.seed)
    used = sorted({k for i, j, _ in pairs for k in (i, j)})
    position = {k: p for p, k in enumerate(used)}
    preprocessing = model.config.preprocessing
    transform = build_transform(preprocessing, train=False)
    raw = pool.cast_column("image", ImageFeature(decode=False))
    pixel_values = []
    for k in used:
        image = load_rgb_image(raw[k]["image"], SkippedImages())
        if image is None:
            raise ValueError(f"image {k} of the evaluated split cannot be decoded; cannot draw its attention.")
        pixel_values.append(transform(image))
    batch = torch.stack(pixel_values)
    batch_pairs = [(position[i], position[j]) for i, j, _ in pairs]
    attention = pair_attention(model.to(device), batch.to(device), batch_pairs)
    names = pool.features["label"].int2str
    plot_attention_maps(
        unnormalise(batch, preprocessing["image_mean"], preprocessing["image_std"]),
        [(position[i], position[j], positive) for i, j, positive in pairs],
        attention,
        [names(int(labels[k])) for k in used],
        path,
    )


def _write_report(
    plan: EvaluationPlan,
    ns: argparse.Namespace,
    device: torch.device,
    embedded: Embedded,
    baseline_embedded: Embedded | None,
    metrics: dict[str, float],
    baseline_metrics: dict[str, float] | None,
) -> Path:
    """Write the report into a staging folder and swap it in, so ``report/`` is always complete."""
    from ..evaluation.reports import plot_recall_at_k, write_report

    target = plan.output_dir / "report"
    with staged_directory(target) as staging:
        max_k = max(plan.ks)
        curves = {"model": _curve(embedded, max_k)}
        if baseline_embedded is not None:
            curves["baseline"] = _curve(baseline_embedded, max_k)
        title = f"Recall@K on {Path(str(ns.dataset)).name} ({plan.split_name})"
        plot_recall_at_k(curves, staging / "recall_at_k.png", title)
        pictures = {"recall_at_k.png": "Recall@K"}
        _retrieval_grid(plan, embedded, ns, staging / "retrieval_grid.png")
        pictures["retrieval_grid.png"] = f"{ns.num_queries} queries and their {ns.top_k} nearest neighbours"
        if plan.training_model is not None:
            _attention_maps(plan, ns, device, staging / "attention_maps.png")
            pictures["attention_maps.png"] = "Cross-image attention of positive and negative pairs"
        table = {"model": metrics, **({"baseline": baseline_metrics} if baseline_metrics else {})}
        details = {
            "model": ns.model,
            "dataset": ns.dataset,
            "split": plan.split_name,
            "images": len(plan.queries) + (len(plan.gallery) if plan.gallery is not None else 0),
            "classes": len(np.unique(np.concatenate([e[1] for e in embedded]))),
        }
        if ns.baseline_model:
            details["baseline model"] = ns.baseline_model
        if ns.checkpoint:
            details["attention checkpoint"] = ns.checkpoint
        details["Recall@K for K = 1.." + str(max_k)] = "[recall_at_k.json](recall_at_k.json)"
        (staging / "recall_at_k.json").write_text(json.dumps({"k": list(range(1, max_k + 1)), **curves}, indent=2))
        write_report(staging, table, pictures, details)
    return target


def _print_metrics(metrics: dict[str, float], baseline: dict[str, float] | None) -> None:
    header = f"{'metric':<12} {'model':>8}" + (f" {'baseline':>9}" if baseline else "")
    print(header)
    for key, value in metrics.items():
        line = f"{key:<12} {value:>8.4f}"
        if baseline:
            line += f" {baseline.get(key, float('nan')):>9.4f}"
        print(line)


def run_evaluate(ns: argparse.Namespace) -> int:
    """Run ``crossmetric evaluate``; 0 on success, 2 (with a message, nothing written) on a user mistake."""
    try:
        plan = prepare(ns)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        print(f"crossmetric evaluate: error: {error}", file=sys.stderr)
        return 2
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    embedded = _embed(plan.embedder, plan, ns, device)
    metrics = _metrics(embedded, plan.ks, ns.seed)
    if ns.rerank_top_k:  # the head's conditional similarity re-ranks the top K (evaluation/reranking.py)
        metrics.update(rerank_metrics(rerank_source(ns), plan.queries, plan.gallery, ns, device))
    baseline_embedded = baseline_metrics = None
    if plan.baseline is not None:
        baseline_embedded = _embed(plan.baseline, plan, ns, device)
        baseline_metrics = _metrics(baseline_embedded, plan.ks, ns.seed)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(plan.output_dir / "metrics.json", json.dumps(metrics, indent=2))
    if baseline_metrics is not None:
        write_atomic(plan.output_dir / "baseline_metrics.json", json.dumps(baseline_metrics, indent=2))
    report = _write_report(plan, ns, device, embedded, baseline_embedded, metrics, baseline_metrics)
    _print_metrics(metrics, baseline_metrics)
    print(f"metrics written to {plan.output_dir / 'metrics.json'}; report in {report}")
    return 0


def main(argv: Sequence[str]) -> int:
    """Parse ``argv`` and run ``crossmetric evaluate``."""
    parser = argparse.ArgumentParser(
        prog="crossmetric evaluate",
        description="Embed a dataset's test split with a model, compute retrieval metrics and write a report with "
        "pictures.",
    )
    return run_evaluate(add_evaluate_arguments(parser).parse_args(list(argv)))
