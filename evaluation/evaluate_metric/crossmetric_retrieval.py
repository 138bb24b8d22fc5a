"""Hugging Face ``evaluate`` module for crossmetric's retrieval metrics (Recall@K, MAP@R, R-precision, NMI).

A thin wrapper: the numbers come from :func:`crossmetric.evaluation.metrics.retrieval_metrics` and
:func:`crossmetric.evaluation.metrics.query_gallery_metrics`, so both routes agree exactly. It is loaded
from its local path, offline (``evaluate`` copies this file into its module cache, so the import below is
absolute; ``crossmetric`` must be installed)::

    import evaluate
    metric = evaluate.load("/path/to/crossmetric/training/evaluate_metric/crossmetric_retrieval.py")
    metric.compute(embeddings=embeddings, labels=labels, ks=[1, 2, 4, 8])

or ``crossmetric.evaluation.metrics.load_evaluate_metric()``. The ``query_gallery`` configuration takes
an extra boolean column ``is_query`` (True: query, False: gallery item) for the In-Shop protocol.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from crossmetric.evaluation.metrics import query_gallery_metrics, retrieval_metrics

_DESCRIPTION = """
Retrieval metrics for deep metric learning, as in Musgrave et al. 2020 ("A Metric Learning Reality
Check") and pytorch-metric-learning's AccuracyCalculator. Leave-one-out by default (every item queries
all the others); configuration "query_gallery" separates queries from the gallery (In-Shop).
Embeddings must be L2-normalised; similarity is the inner product.
"""

_KWARGS_DESCRIPTION = """
Args:
    embeddings: sequence of float32 vectors (one L2-normalised embedding per item).
    labels: int64 class label per item.
    is_query: ("query_gallery" configuration only) bool per item, True for queries.
    ks: the K of Recall@K (default [1, 2, 4, 8]).
    nmi: also compute NMI of k-means (default True for leave-one-out, False for query_gallery).
    seed: k-means seed (default 0).
    use_faiss: None (faiss if installed), True or False.
Returns:
    dict with "recall@K" for each K, "map@r", "r_precision" and (if nmi) "nmi", as floats.
Example:
    >>> metric = evaluate.load("crossmetric/training/evaluate_metric/crossmetric_retrieval.py")
    >>> metric.compute(embeddings=[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], labels=[0, 0, 1], ks=[1], nmi=False)
    {'recall@1': 1.0, 'map@r': 1.0, 'r_precision': 1.0}
"""

_CITATION = """
@inproceedings{musgrave2020metric,
  title={A Metric Learning Reality Check},
  author={Musgrave, Kevin and Belongie, Serge and Lim, Ser-Nam},
  booktitle={ECCV},
  year={2020}
}
"""


class CrossmetricRetrieval(evaluate.Metric):
    """Recall@K, MAP@R, R-precision and NMI of embeddings against class labels."""

    def _info(self) -> evaluate.MetricInfo:
        features = {"embeddings": datasets.Sequence(datasets.Value("float32")), "labels": datasets.Value("int64")}
        if self.config_name == "query_gallery":
            features["is_query"] = datasets.Value("bool")
        elif self.config_name != "default":
            raise ValueError(f"Unknown configuration {self.config_name!r}: use 'default' or 'query_gallery'.")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(features),
            reference_urls=["https://arxiv.org/abs/2003.08505"],
        )

    def _compute(
        self,
        embeddings,
        labels,
        is_query=None,
        ks=(1, 2, 4, 8),
        nmi=None,
        seed=0,
        use_faiss=None,
    ) -> dict[str, float]:
        x = np.asarray(embeddings, dtype=np.float32)
        y = np.asarray(labels, dtype=np.int64)
        options = {"seed": seed, "use_faiss": use_faiss, "progress": len(y) >= 10_000}
        if is_query is None:
            return retrieval_metrics(x, y, ks, nmi=True if nmi is None else nmi, **options)
        query = np.asarray(is_query, dtype=bool)
        return query_gallery_metrics(x[query], y[query], x[~query], y[~query], ks, nmi=bool(nmi), **options)
