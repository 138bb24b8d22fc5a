"""The picture report of ``crossmetric evaluate``: ``report/`` with ``recall_at_k.png`` (one curve per row: model,
baseline model, raw pixels, zero-shot), ``retrieval_grid.png``, optionally ``attention_maps.png``, and ``report.md``.

Kept apart from the command so the command stays about arguments and the report can be written from Python too.
The folder is written into a staging folder and swapped in, so ``report/`` is always complete.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.atomic_files import staged_directory
from .evaluator import Embedded, Evaluator


@dataclass
class ReportContent:
    """What the report shows.

    Args:
        evaluator: the evaluated split(s), the K and the seed.
        rows: row name -> its embeddings (the first row, the model, draws the retrieval grid).
        metrics: row name -> its metrics, in the table's column order.
        details: the list at the top of ``report.md`` (model, dataset, split, skipped baselines, ...).
        title: the title of ``recall_at_k.png``.
    """

    evaluator: Evaluator
    rows: Mapping[str, Embedded]
    metrics: Mapping[str, Mapping[str, float]]
    details: dict[str, Any] = field(default_factory=dict)
    title: str = ""


def recall_curve(embedded: Embedded, max_k: int) -> list[float]:
    """Recall@1..``max_k`` of one row (leave-one-out, or query vs gallery)."""
    from .reports import recall_at_k_curve

    if len(embedded) == 1:
        return recall_at_k_curve(*embedded[0], max_k)
    (q, ql), (g, gl) = embedded
    return recall_at_k_curve(q, ql, max_k, g, gl)


def draw_retrieval_grid(
    evaluator: Evaluator, embedded: Embedded, num_queries: int, top_k: int, seed: int, path: Path
) -> None:
    """Sample queries (seeded) and draw them with their nearest neighbours, as the metrics found them."""
    from .reports import display_images, nearest_neighbours, plot_retrieval_grid, sample_queries

    (q, ql) = embedded[0]
    (g, gl), gallery = (embedded[1], evaluator.gallery) if len(embedded) == 2 else ((q, ql), evaluator.queries)
    chosen = sample_queries(ql, gl if len(embedded) == 2 else None, num_queries, seed)
    self_ids = chosen if len(embedded) == 1 else None
    neighbours, scores = nearest_neighbours(q[chosen], g, top_k, self_ids=self_ids)
    names = evaluator.queries.features["label"].int2str
    plot_retrieval_grid(
        display_images(evaluator.queries, chosen),
        [names(int(ql[i])) for i in chosen],
        [display_images(gallery, row) for row in neighbours],
        [[names(int(gl[n])) for n in row] for row in neighbours],
        scores,
        path,
    )


def draw_attention_maps(
    model: Any, evaluator: Evaluator, pairs_per_kind: int, seed: int, device: torch.device, path: Path
) -> None:
    """Attention maps of seeded positive and negative pairs of the evaluated images, from the training model's head."""
    from datasets import Image as ImageFeature

    from ..data.image_loading import SkippedImages, load_rgb_image
    from ..data.transforms import build_transform
    from .attention_maps import pair_attention, plot_attention_maps, select_pairs, unnormalise

    pool = evaluator.gallery if evaluator.gallery is not None else evaluator.queries
    labels = np.asarray(pool.with_format("numpy")["label"])
    pairs = select_pairs(labels, pairs_per_kind, seed)
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


def write_evaluation_report(
    target: Path,
    content: ReportContent,
    *,
    num_queries: int,
    top_k: int,
    seed: int,
    attention: tuple[Any, int, torch.device] | None = None,
) -> Path:
    """Write ``target`` (``report/``); ``attention`` = (training model with its head, pairs per kind, device) adds
    ``attention_maps.png``."""
    from .reports import plot_recall_at_k, write_report

    evaluator = content.evaluator
    with staged_directory(target) as staging:
        max_k = max(evaluator.ks)
        curves = {name: recall_curve(embedded, max_k) for name, embedded in content.rows.items()}
        plot_recall_at_k(curves, staging / "recall_at_k.png", content.title)
        pictures = {"recall_at_k.png": "Recall@K"}
        model_rows = next(iter(content.rows.values()))
        draw_retrieval_grid(evaluator, model_rows, num_queries, top_k, seed, staging / "retrieval_grid.png")
        pictures["retrieval_grid.png"] = f"{num_queries} queries and their {top_k} nearest neighbours"
        if attention is not None:
            model, pairs, device = attention
            draw_attention_maps(model, evaluator, pairs, seed, device, staging / "attention_maps.png")
            pictures["attention_maps.png"] = "Cross-image attention of positive and negative pairs"
        details = dict(content.details)
        details["Recall@K for K = 1.." + str(max_k)] = "[recall_at_k.json](recall_at_k.json)"
        (staging / "recall_at_k.json").write_text(json.dumps({"k": list(range(1, max_k + 1)), **curves}, indent=2))
        write_report(staging, dict(content.metrics), pictures, details)
    return target
