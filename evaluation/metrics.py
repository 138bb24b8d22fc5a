"""Retrieval metrics for deep metric learning: Recall@K, MAP@R, R-precision and NMI.

Definitions follow Musgrave, Belongie & Lim, "A Metric Learning Reality Check" (ECCV 2020) and
pytorch-metric-learning's ``AccuracyCalculator``, whose numbers these functions reproduce:

- Leave-one-out (:func:`retrieval_metrics` without a gallery): every item queries all *other* items; its own row
  is removed by index, so exact duplicates and ties cannot remove a different item instead.
  Query-gallery (:func:`retrieval_metrics` with ``gallery_embeddings``, or :func:`query_gallery_metrics`, In-Shop):
  queries search a separate gallery.
- R of a query = number of other same-class items (leave-one-out) or same-class gallery items.
  Queries with R = 0 are excluded from Recall@K, MAP@R and R-precision, as ``AccuracyCalculator``
  excludes its "lone" queries; NMI uses every item.
- Recall@K: fraction of queries with a same-class item among their K nearest neighbours.
- R-precision: same-class fraction of the R nearest neighbours.
- MAP@R: (1/R) · sum over i <= R of precision@i · [neighbour i is same-class].
- NMI: ``sklearn.metrics.normalized_mutual_info_score`` of the labels and a k-means clustering with k =
  number of classes (faiss k-means, 20 iterations, as ``AccuracyCalculator``; sklearn when faiss is
  missing).

Embeddings must be L2-normalised; similarity is the inner product. Neighbours are ordered by score, exact
ties by the lower gallery index (see :mod:`.nearest_neighbors`). Every kNN metric comes from one
neighbour search per query with k = max(max K, R), in chunks, so memory stays bounded (no N×N matrix).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from .nearest_neighbors import DEFAULT_MEMORY_BUDGET, iter_knn, resolve_use_faiss

EVALUATE_METRIC_PATH = Path(__file__).resolve().parent / "evaluate_metric" / "crossmetric_retrieval.py"
KMEANS_ITERATIONS = 20  # as pytorch-metric-learning's FaissKMeans(niter=20)
NORM_TOLERANCE = 1e-3


def _as_embeddings(x: Any, name: str, normalize: bool) -> np.ndarray:
    """Convert a numpy array / torch tensor to a C-contiguous float32 (N, D) matrix and validate it."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D (num_items, dim) array; got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values; check the model outputs before evaluating.")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    if normalize:
        if (norms == 0).any():
            raise ValueError(f"{name} has all-zero rows, which cannot be L2-normalised.")
        return x / norms[:, None]
    if np.abs(norms - 1).max() > NORM_TOLERANCE:
        raise ValueError(
            f"{name} must be L2-normalised (row norms range from {norms.min():.4g} to {norms.max():.4g}): "
            "apply torch.nn.functional.normalize(x, dim=-1) first, or pass normalize=True."
        )
    return x


def _as_labels(y: Any, name: str, length: int) -> np.ndarray:
    """Convert labels to a 1-D numpy array of the given length."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != length:
        raise ValueError(f"{name} must be a 1-D array with one label per embedding ({length}); got shape {y.shape}.")
    return y


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty sequence of positive integers; got {ks!r}.")
    return ks


def cluster_nmi(embeddings: np.ndarray, labels: np.ndarray, *, seed: int = 0, use_faiss: bool | None = None) -> float:
    """NMI between ``labels`` and a k-means clustering of ``embeddings`` with k = number of classes.

    faiss k-means (``niter=20``, like ``AccuracyCalculator``; pass ``seed=1234``, faiss' default, to
    reproduce its number exactly) when faiss is available, else sklearn's ``KMeans`` with the same
    iteration count and one initialisation (close, not identical).
    """
    num_clusters = len(np.unique(labels))
    if resolve_use_faiss(use_faiss):
        import faiss

        # min_points_per_centroid=1 only silences faiss' "too few points per centroid" warning, which
        # every many-class DML test set triggers; it does not change the clustering.
        kmeans = faiss.Kmeans(
            embeddings.shape[1], num_clusters, niter=KMEANS_ITERATIONS, seed=seed, min_points_per_centroid=1
        )
        kmeans.train(embeddings)
        _, assignment = kmeans.index.search(embeddings, 1)
        assignment = assignment[:, 0]
    else:
        from sklearn.cluster import KMeans

        kmeans = KMeans(num_clusters, n_init=1, max_iter=KMEANS_ITERATIONS, random_state=seed)
        assignment = kmeans.fit_predict(embeddings)
    return float(normalized_mutual_info_score(labels, assignment))


def _knn_metrics(
    queries: np.ndarray,
    query_codes: np.ndarray,
    gallery: np.ndarray,
    gallery_codes: np.ndarray,
    r: np.ndarray,
    ks: tuple[int, ...],
    *,
    leave_one_out: bool,
    use_faiss: bool | None,
    batch_size: int,
    memory_budget: int,
    progress: bool,
) -> dict[str, float]:
    """Recall@K, MAP@R and R-precision over the queries with R > 0, from one chunked neighbour search."""
    valid = np.flatnonzero(r > 0)
    if len(valid) == 0:
        warnings.warn("No query has a same-class item to retrieve; retrieval metrics are NaN.", stacklevel=3)
        return {**{f"recall@{k}": float("nan") for k in ks}, "map@r": float("nan"), "r_precision": float("nan")}
    available = len(gallery) - (1 if leave_one_out else 0)
    need = np.minimum(np.maximum(r[valid], max(ks)), available)
    hits = dict.fromkeys(ks, 0)
    sum_ap = sum_rp = 0.0
    for rows, neighbours in iter_knn(
        queries,
        gallery,
        need,
        subset=valid,
        self_ids=valid if leave_one_out else None,
        use_faiss=use_faiss,
        batch_size=batch_size,
        memory_budget=memory_budget,
        progress=progress,
    ):
        query_r = r[valid[rows]][:, None]
        match = gallery_codes[neighbours] == query_codes[valid[rows]][:, None]
        for k in ks:
            hits[k] += int(match[:, :k].any(axis=1).sum())
        rank = np.arange(1, neighbours.shape[1] + 1)
        relevant = match & (rank <= query_r)
        sum_rp += float((relevant.sum(axis=1) / query_r[:, 0]).sum())
        precision_at_i = np.cumsum(relevant, axis=1) / rank
        sum_ap += float(((precision_at_i * relevant).sum(axis=1) / query_r[:, 0]).sum())
    n = len(valid)
    return {**{f"recall@{k}": hits[k] / n for k in ks}, "map@r": sum_ap / n, "r_precision": sum_rp / n}


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    gallery_embeddings: Any | None = None,
    gallery_labels: Any | None = None,
    nmi: bool = True,
    seed: int = 0,
    use_faiss: bool | None = None,
    batch_size: int = 4096,
    normalize: bool = False,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
) -> dict[str, float]:
    """Retrieval metrics of ``embeddings`` as queries: leave-one-out, or against a separate gallery when given.

    The one entry point of both protocols (as ``AccuracyCalculator.get_accuracy``):

    - no gallery: every item queries all the *other* items (its own row removed by index); R = number of other
      same-class items;
    - ``gallery_embeddings`` and ``gallery_labels`` (In-Shop protocol): the queries search the gallery and nothing is
      removed from the neighbours (queries are not in the gallery); R = number of same-class gallery items.

    Queries with R = 0 are excluded from the kNN metrics. ``nmi`` clusters the queries (as ``AccuracyCalculator``).

    Args:
        embeddings: (N, D) L2-normalised query embeddings, numpy array or torch tensor.
        labels: (N,) class labels (any hashable dtype numpy can sort).
        ks: the K of Recall@K.
        gallery_embeddings: (M, D) gallery embeddings, or None for leave-one-out.
        gallery_labels: (M,) gallery labels; given exactly when ``gallery_embeddings`` is.
        nmi: also cluster the query embeddings and report NMI (costs a k-means run).
        seed: k-means seed.
        use_faiss: kNN and k-means through faiss (True), torch/sklearn (False), faiss if installed (None).
        batch_size: most queries searched at once.
        normalize: L2-normalise the embeddings here instead of requiring normalised input.
        memory_budget: bytes one query chunk may use (scores, candidates, masks).
        progress: show a progress bar.

    Returns:
        ``{"recall@K": ..., "map@r": ..., "r_precision": ..., "nmi": ...}`` as floats; NaN when no query has a
        same-class item to retrieve.
    """
    if (gallery_embeddings is None) != (gallery_labels is None):
        raise ValueError("pass gallery_embeddings and gallery_labels together (or neither, for leave-one-out).")
    ks = _check_ks(ks)
    leave_one_out = gallery_embeddings is None
    x = _as_embeddings(embeddings, "embeddings" if leave_one_out else "query embeddings", normalize)
    y = _as_labels(labels, "labels" if leave_one_out else "query labels", len(x))
    if leave_one_out:
        if len(x) < 2:
            raise ValueError("leave-one-out retrieval needs at least 2 embeddings.")
        g, gy = x, y
    else:
        g = _as_embeddings(gallery_embeddings, "gallery_embeddings", normalize)
        if x.shape[1] != g.shape[1]:
            raise ValueError(f"query and gallery embeddings differ in dimension: {x.shape[1]} vs {g.shape[1]}.")
        gy = _as_labels(gallery_labels, "gallery_labels", len(g))
    _, codes = np.unique(y if leave_one_out else np.concatenate([y, gy]), return_inverse=True)
    query_codes, gallery_codes = (codes, codes) if leave_one_out else (codes[: len(x)], codes[len(x) :])
    r = np.bincount(gallery_codes, minlength=codes.max() + 1)[query_codes] - (1 if leave_one_out else 0)
    out = _knn_metrics(
        x,
        query_codes,
        g,
        gallery_codes,
        r,
        ks,
        leave_one_out=leave_one_out,
        use_faiss=use_faiss,
        batch_size=batch_size,
        memory_budget=memory_budget,
        progress=progress,
    )
    if nmi:
        out["nmi"] = cluster_nmi(x, query_codes, seed=seed, use_faiss=use_faiss)
    return out


def query_gallery_metrics(
    query_embeddings: Any,
    query_labels: Any,
    gallery_embeddings: Any,
    gallery_labels: Any,
    ks: Sequence[int] = (1, 10, 20, 30, 40, 50),
    *,
    nmi: bool = False,
    **options: Any,
) -> dict[str, float]:
    """Query-gallery retrieval metrics (In-Shop protocol): :func:`retrieval_metrics` with a gallery.

    Kept under its own name, with the In-Shop Recall@K defaults (1, 10, 20, 30, 40, 50) and no NMI by default.
    ``options`` (``seed``, ``use_faiss``, ``batch_size``, ``normalize``, ``memory_budget``, ``progress``) go to
    :func:`retrieval_metrics`.
    """
    return retrieval_metrics(
        query_embeddings,
        query_labels,
        ks,
        gallery_embeddings=gallery_embeddings,
        gallery_labels=gallery_labels,
        nmi=nmi,
        **options,
    )


def load_evaluate_metric(**kwargs: Any) -> Any:
    """``evaluate.load`` the local ``crossmetric_retrieval`` module shipped with this package (offline).

    ``kwargs`` go to ``evaluate.load`` (e.g. ``config_name="query_gallery"``).
    """
    import evaluate

    return evaluate.load(str(EVALUATE_METRIC_PATH), **kwargs)
