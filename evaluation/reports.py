"""The pictures and the summary page of ``crossmetric evaluate``: Recall@K curves, a retrieval grid, ``report.md``.

Figures are drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg canvas: no pyplot, so no global
figure state and no display needed (the command runs on headless machines). Neighbours are found by the same exact
search as the metrics (:func:`.nearest_neighbors.iter_knn`: score descending, ties by lower index, self removed by
index), so the grid shows exactly the neighbours that Recall@K counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset
from datasets import Image as ImageFeature
from matplotlib.figure import Figure
from PIL import Image

from ..data.image_loading import SkippedImages, load_rgb_image
from .metrics import query_gallery_metrics, retrieval_metrics
from .nearest_neighbors import iter_knn

CORRECT, WRONG = "#1a9850", "#d73027"  # frame colours of the retrieval grid (green / red)
THUMBNAIL = 160  # longest side, in pixels, of an image kept for display


def recall_at_k_curve(
    queries: np.ndarray,
    query_labels: np.ndarray,
    max_k: int,
    gallery: np.ndarray | None = None,
    gallery_labels: np.ndarray | None = None,
) -> list[float]:
    """Recall@K for K = 1..``max_k``: leave-one-out over ``queries``, or queries against a separate gallery.

    Computed by the same metric functions as ``metrics.json``, so the curve passes through its Recall@K values.
    """
    ks = range(1, max_k + 1)
    if gallery is None:
        values = retrieval_metrics(queries, query_labels, ks=ks, nmi=False, progress=False)
    else:
        values = query_gallery_metrics(queries, query_labels, gallery, gallery_labels, ks=ks, progress=False)
    return [values[f"recall@{k}"] for k in ks]


def nearest_neighbours(
    queries: np.ndarray, gallery: np.ndarray, k: int, self_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest gallery items of every query: indices (Q×k) and inner-product scores (Q×k).

    ``self_ids`` (leave-one-out) gives each query's own gallery index, which is excluded. Order: score descending,
    exact ties by the lower gallery index (as the metrics count them).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    available = len(gallery) - (1 if self_ids is not None else 0)
    k = min(k, available)
    if k < 1:
        raise ValueError(f"no gallery item left to retrieve (gallery of {len(gallery)}).")
    indices = np.empty((len(queries), k), dtype=np.int64)
    need = np.full(len(queries), k)
    self_ids = None if self_ids is None else np.asarray(self_ids, dtype=np.int64)
    for rows, neighbours in iter_knn(queries, gallery, need, self_ids=self_ids, progress=False):
        indices[rows] = neighbours[:, :k]
    scores = np.einsum("qd,qkd->qk", queries, gallery[indices])
    return indices, scores


def sample_queries(query_labels: np.ndarray, gallery_labels: np.ndarray | None, count: int, seed: int) -> np.ndarray:
    """``count`` query indices drawn with ``seed``, sorted, preferring queries that have a match to find.

    A query has a match when another item (leave-one-out, ``gallery_labels=None``) or a gallery item shares its
    class; queries without one are drawn only when too few have one.
    """
    query_labels = np.asarray(query_labels)
    if gallery_labels is None:
        _, codes, counts = np.unique(query_labels, return_inverse=True, return_counts=True)
        has_match = counts[codes] > 1
    else:
        has_match = np.isin(query_labels, np.asarray(gallery_labels))
    rng = np.random.default_rng(seed)
    preferred, others = np.flatnonzero(has_match), np.flatnonzero(~has_match)
    chosen = rng.permutation(preferred)[:count]
    if len(chosen) < count:
        chosen = np.concatenate([chosen, rng.permutation(others)[: count - len(chosen)]])
    return np.sort(chosen)


def display_images(split: Dataset, indices: Sequence[int], size: int = THUMBNAIL) -> list[Image.Image]:
    """The original images (RGB, not normalised) of ``split[indices]``, shrunk to at most ``size`` pixels."""
    raw = (
        split.cast_column("image", ImageFeature(decode=False))
        if isinstance(split.features["image"], ImageFeature)
        else split
    )
    images = []
    for index in indices:
        image = load_rgb_image(raw[int(index)]["image"], SkippedImages())
        if image is None:  # unreadable: a grey placeholder keeps the grid's layout
            image = Image.new("RGB", (size, size), (128, 128, 128))
        image.thumbnail((size, size))
        images.append(image)
    return images


def plot_recall_at_k(curves: Mapping[str, Sequence[float]], path: str | Path, title: str = "") -> Path:
    """Recall@K against K (log-2 axis), one line per model, written as a PNG."""
    figure = Figure(figsize=(6.4, 4.2), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    for name, values in curves.items():
        ks = np.arange(1, len(values) + 1)
        axes.plot(ks, values, marker="o", markersize=3, label=f"{name} (R@1 {values[0]:.3f})")
    longest = max(len(v) for v in curves.values())
    axes.set_xscale("log", base=2)
    ticks = [2**i for i in range(int(math.log2(longest)) + 1)]
    axes.set_xticks(ticks, [str(t) for t in ticks])
    axes.set_xlim(0.9, longest * 1.1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("K (neighbours retrieved)")
    axes.set_ylabel("Recall@K")
    axes.set_title(title or "Recall@K")
    axes.grid(True, which="major", alpha=0.3)
    axes.legend(loc="lower right")
    figure.savefig(path)
    return Path(path)


def _show(axes: Any, image: Image.Image, title: str, colour: str | None, fontsize: float = 8) -> None:
    """An image in a cell, with an optional coloured frame (spines kept, ticks removed)."""
    axes.imshow(np.asarray(image))
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title, fontsize=fontsize, color=colour or "black")
    for spine in axes.spines.values():
        spine.set_visible(colour is not None)
        if colour is not None:
            spine.set_edgecolor(colour)
            spine.set_linewidth(1.5 if colour == "black" else 4)


def _short(text: str, limit: int = 18) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def plot_retrieval_grid(
    query_images: Sequence[Image.Image],
    query_labels: Sequence[str],
    neighbour_images: Sequence[Sequence[Image.Image]],
    neighbour_labels: Sequence[Sequence[str]],
    neighbour_scores: np.ndarray,
    path: str | Path,
) -> Path:
    """One row per query: the query, then its nearest neighbours, framed green (same class) or red (other class).

    Each neighbour's title is its rank, class and cosine similarity to the query.
    """
    rows, columns = len(query_images), 1 + max(len(n) for n in neighbour_images)
    figure = Figure(figsize=(1.6 * columns + 0.3, 1.75 * rows + 0.5), dpi=110, layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    for r in range(rows):
        _show(grid[r, 0], query_images[r], f"query\n{_short(query_labels[r])}", "black", fontsize=8.5)
        grid[r, 0].title.set_fontweight("bold")
        for c in range(1, columns):
            axes = grid[r, c]
            if c - 1 >= len(neighbour_images[r]):
                axes.set_axis_off()
                continue
            label = neighbour_labels[r][c - 1]
            colour = CORRECT if label == query_labels[r] else WRONG
            title = f"#{c} {_short(label)}\n{neighbour_scores[r, c - 1]:.3f}"
            _show(axes, neighbour_images[r][c - 1], title, colour)
    figure.suptitle("Nearest neighbours (green: same class, red: other class; cosine similarity)", fontsize=10)
    figure.savefig(path)
    return Path(path)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def write_report(
    report_dir: str | Path,
    metrics: Mapping[str, Mapping[str, Any]],
    pictures: Mapping[str, str],
    details: Mapping[str, Any],
) -> Path:
    """``report.md``: what was evaluated, the metrics table (one column per model) and the pictures.

    Args:
        metrics: model name -> its metrics; the first model's keys give the rows.
        pictures: file name (inside ``report_dir``) -> caption.
        details: shown as a list at the top (model, dataset, split, image and class counts, ...).
    """
    names = list(metrics)
    lines = ["# crossmetric evaluation", ""]
    lines += [f"- **{key}**: {value}" for key, value in details.items()]
    lines += ["", "## Metrics", "", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in metrics[names[0]]:
        lines.append(f"| {key} | " + " | ".join(_cell(metrics[n].get(key, "")) for n in names) + " |")
    lines += ["", "## Pictures", ""]
    for file_name, caption in pictures.items():
        lines += [f"### {caption}", "", f"![{caption}]({file_name})", ""]
    path = Path(report_dir) / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
