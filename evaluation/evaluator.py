"""One evaluation protocol for every caller: embed unseen classes and compute their retrieval metrics.

:class:`Evaluator` is chosen from a dataset's splits (leave-one-out on one split, or the In-Shop query-vs-gallery
protocol) and serves the trainer (validation selection, the final test), ``crossmetric evaluate`` and the benchmark
scripts, like sentence-transformers' evaluators. It also scores the two floors every
report shows: raw pixels and the untrained (zero-shot) embedder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.dml_dataset import label_array
from ..inference.embedding import EvalTransform, embed_images, pooled_features, pooler_output
from ..modeling.modeling_crossmetric import CrossMetricModel
from .metrics import retrieval_metrics


def embed_split(
    embedder: CrossMetricModel,
    split: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
    pooled: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (N×D float32) and labels (N) of a ``datasets`` split with ``image`` and ``label`` columns,
    preprocessed as the model's evaluation transform (resize, centre crop), through the one embedding loop
    (:func:`~crossmetric.inference.embedding.embed_images`). ``pooled`` returns the backbone's pooled features (N×C,
    before the embedding layer) instead. Every image must decode (an unreadable one is a ``ValueError``)."""
    result = embed_images(
        embedder, EvalTransform(embedder.config.preprocessing), split, batch_size, device, progress,
        desc="embedding", forward=pooled_features if pooled else pooler_output, skip_unreadable=False,
        channels_last=True,  # faster CPU convolutions; values unchanged
    )  # fmt: skip
    return result.embeddings, np.asarray(label_array(split), dtype=np.int64)


class DivergedModelError(ValueError):
    """The embedder produced non-finite or collapsed embeddings: training diverged."""


LEAVE_ONE_OUT_KS = (1, 2, 4, 8)
QUERY_GALLERY_KS = (1, 10, 20, 30, 40, 50)  # the In-Shop protocol's K
Embedded = list[tuple[np.ndarray, np.ndarray]]  # (embeddings, labels) of the split, or of query and gallery


@dataclass
class Evaluator:
    """Retrieval metrics of an embedder on one evaluation set.

    Args:
        queries: a ``datasets`` split with ``image`` and ``label``; every image queries all others (leave-one-out)
            unless ``gallery`` is given.
        gallery: In-Shop's gallery split: the queries search it instead of each other.
        name: what the set is called in logs and reports (``"validation"``, ``"test"``, ``"query vs gallery"``).
        ks: K of Recall@K (default 1, 2, 4, 8; with a gallery 1, 10, 20, 30, 40, 50).
    """

    queries: Any
    gallery: Any | None = None
    name: str = "test"
    ks: tuple[int, ...] | None = None
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.ks is None:
            self.ks = LEAVE_ONE_OUT_KS if self.gallery is None else QUERY_GALLERY_KS
        if self.gallery is None and len(self.queries) < 2:
            raise ValueError(f"split {self.name!r} has {len(self.queries)} image(s); leave-one-out needs at least 2.")

    @classmethod
    def from_dataset(cls, dataset: Any, split: str = "test", max_images: int | None = None, **options: Any):
        """The evaluator of ``dataset[split]``; ``"test"`` of a dataset with ``query`` and ``gallery`` splits (In-Shop)
        is query vs gallery. ``max_images`` (at least 2) keeps the first N images of each evaluated split."""
        if max_images is not None and max_images < 2:
            raise ValueError(f"max_images must be >= 2 (leave-one-out needs a pair), got {max_images}.")
        if split not in dataset and split == "test" and {"query", "gallery"} <= set(dataset):
            queries, gallery, name = dataset["query"], dataset["gallery"], "query vs gallery"
        elif split in dataset:
            queries, gallery, name = dataset[split], None, split
        else:
            raise ValueError(
                f"--split {split!r} is not a split of this dataset: it has {list(dataset)}; pass one of them."
            )
        if max_images is not None:
            queries = queries.select(range(min(max_images, len(queries))))
            gallery = gallery.select(range(min(max_images, len(gallery)))) if gallery is not None else None
        return cls(queries, gallery, name, **options)

    @property
    def splits(self) -> list[Any]:
        return [self.queries] if self.gallery is None else [self.queries, self.gallery]

    def embed(self, embedder: CrossMetricModel, device: Any = None, progress: bool = True) -> Embedded:
        """Embeddings and labels of the split, or of the query and the gallery split."""
        return [
            embed_split(embedder, s, batch_size=self.batch_size, device=device, progress=progress) for s in self.splits
        ]

    def metrics(self, embedded: Embedded) -> dict[str, float]:
        """Recall@K, MAP@R, R-precision and NMI of already computed embeddings.

        Raises:
            DivergedModelError: some embeddings are not finite or not unit vectors (a diverged model).
        """
        for embeddings, _ in embedded:
            norms = np.linalg.norm(embeddings, axis=1)
            broken = int((~np.isfinite(norms) | (norms < 0.5)).sum())
            if broken:
                raise DivergedModelError(
                    f"{broken} of {len(embeddings)} {self.name} embeddings are not finite or not unit vectors: the "
                    "model diverged; lower the learning rates (--learning_rate, --backbone_learning_rate)."
                )
        (embeddings, labels), *gallery = embedded
        options = {"gallery_embeddings": gallery[0][0], "gallery_labels": gallery[0][1]} if gallery else {}
        return retrieval_metrics(embeddings, labels, ks=self.ks, seed=self.seed, progress=False, **options)

    def worst_metrics(self) -> dict[str, float]:
        """What a model that retrieves nothing scores (a diverged candidate is recorded with these)."""
        return {**{f"recall@{k}": 0.0 for k in self.ks}, "map@r": 0.0, "r_precision": 0.0, "nmi": 0.0}

    def __call__(self, embedder: CrossMetricModel, device: Any = None, progress: bool = True) -> dict[str, float]:
        return self.metrics(self.embed(embedder, device, progress))

    def embed_features(self, features: Callable[[Any], tuple[np.ndarray, np.ndarray]]) -> Embedded:
        """:meth:`embed` for any embedding function of a split (e.g. :func:`raw_pixel_features`), so a baseline
        goes through the same splits, metrics and report curves as the model."""
        return [features(s) for s in self.splits]

    def evaluate_features(self, features: Callable[[Any], tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
        """Metrics of any embedding function of a split (e.g. :func:`raw_pixel_features`)."""
        return self.metrics(self.embed_features(features))


def raw_pixel_features(split: Any, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The floor every trained model must beat: each image resized to ``size``×``size`` RGB, centred on its own mean
    (a plain background counts as nothing, whatever its colour), L2-normalised."""
    from PIL import Image

    from ..data.image_loading import SkippedImages, load_rgb_image

    raw = split.cast_column("image", type(split.features["image"])(decode=False))
    rows, skipped = [], SkippedImages()
    for record in raw["image"]:
        image = load_rgb_image(record, skipped)
        grey = (
            np.zeros((size, size), np.float32)
            if image is None
            else np.asarray(image.convert("L").resize((size, size), Image.BILINEAR), np.float32)
        )
        vector = grey.reshape(-1) - grey.mean()
        rows.append(vector / max(float(np.linalg.norm(vector)), 1e-12))
    return np.stack(rows), np.asarray(split.with_format("numpy")["label"])
