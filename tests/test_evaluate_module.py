"""The local ``evaluate`` module loads offline from its path and returns the functions' numbers."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_EVALUATE_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import evaluate  # noqa: E402  (after the offline switches)

from crossmetric.evaluation.metrics import (  # noqa: E402
    EVALUATE_METRIC_PATH,
    load_evaluate_metric,
    query_gallery_metrics,
    retrieval_metrics,
)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline even if another test module imported evaluate before the switches above were set."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)


def data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 30, 240)
    x = rng.normal(size=(30, 8))[labels] + 0.8 * rng.normal(size=(240, 8))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels.astype(np.int64)


@pytest.mark.parametrize(
    "path", [str(EVALUATE_METRIC_PATH), str(EVALUATE_METRIC_PATH.parent)], ids=["script", "folder"]
)
def test_loads_from_local_path_and_equals_functions(path: str) -> None:
    x, y = data()
    metric = evaluate.load(path)
    got = metric.compute(embeddings=x, labels=y, ks=[1, 2, 4, 8], seed=3)
    assert got == retrieval_metrics(x, y, (1, 2, 4, 8), seed=3, progress=False)
    assert set(got) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi"}


def test_batches_and_query_gallery_configuration() -> None:
    x, y = data(1)
    metric = load_evaluate_metric()
    for start in range(0, len(x), 64):  # the usual evaluation loop: one batch of embeddings at a time
        metric.add_batch(embeddings=x[start : start + 64], labels=y[start : start + 64])
    assert metric.compute(ks=[1, 4], nmi=False) == retrieval_metrics(x, y, (1, 4), nmi=False, progress=False)

    is_query = np.arange(len(x)) % 3 == 0
    metric = load_evaluate_metric(config_name="query_gallery")
    got = metric.compute(embeddings=x, labels=y, is_query=is_query, ks=[1, 10])
    expected = query_gallery_metrics(x[is_query], y[is_query], x[~is_query], y[~is_query], (1, 10), progress=False)
    assert got == expected


def test_unknown_configuration_fails_clearly() -> None:
    with pytest.raises(ValueError, match="query_gallery"):
        load_evaluate_metric(config_name="gallery")
