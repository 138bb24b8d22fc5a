"""Retrieval metrics against a brute-force numpy reference, pytorch-metric-learning, and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from crossmetric.evaluation.metrics import cluster_nmi, query_gallery_metrics, retrieval_metrics
from crossmetric.evaluation.nearest_neighbors import canonical_topk

torch.set_num_threads(1)
BACKENDS = [pytest.param(True, id="faiss"), pytest.param(False, id="torch")]


def reference_metrics(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    ks: tuple[int, ...],
    leave_one_out: bool,
) -> dict[str, float]:
    """Brute force, one query at a time: full float64 score row, own index dropped, stable sort.

    Ties are ranked by the lower gallery index, the documented order of the implementation.
    """
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    hits = dict.fromkeys(ks, 0)
    aps, rps = [], []
    for i in range(len(queries)):
        others = np.array([j for j in range(len(gallery)) if not (leave_one_out and j == i)])
        ranked = others[np.lexsort((others, -scores[i, others]))]
        same = gallery_labels[ranked] == query_labels[i]
        r = int(same.sum())
        if r == 0:
            continue
        for k in ks:
            hits[k] += bool(same[:k].any())
        rps.append(same[:r].mean())
        precisions = [same[: rank + 1].mean() for rank in range(r)]
        aps.append(sum(p for p, s in zip(precisions, same[:r]) if s) / r)
    n = len(aps)
    return {
        **{f"recall@{k}": hits[k] / n for k in ks},
        "map@r": float(np.mean(aps)),
        "r_precision": float(np.mean(rps)),
    }


def clustered(n: int, dim: int, num_classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised Gaussian clusters; class sizes vary, some classes have a single item."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    x = rng.normal(size=(num_classes, dim))[labels] + noise * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def tied(n: int, dim: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of ±1/sqrt(dim) entries (dim a power of 4): every inner product is exact, ties abound.

    A few rows are exact duplicates of others with a different label, so that removing the first column
    instead of the query's own index would change the result.
    """
    rng = np.random.default_rng(seed)
    x = rng.choice([-1.0, 1.0], size=(n, dim)) / np.sqrt(dim)
    labels = rng.integers(0, num_classes, n)
    x[n // 2 : n // 2 + 20] = x[:20]
    labels[n // 2 : n // 2 + 20] = (labels[:20] + 1) % num_classes
    return x.astype(np.float32), labels


def assert_same(actual: dict[str, float], expected: dict[str, float]) -> None:
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_random_clusters_match_brute_force(use_faiss: bool) -> None:
    x, y = clustered(400, 8, 60, noise=0.7, seed=0)
    y[::4] = 1000  # one class of 100 items: its queries need R = 99 neighbours, the others far fewer
    ks = (1, 2, 4, 8, 16)
    expected = reference_metrics(x, y, x, y, ks, leave_one_out=True)
    for batch_size, budget in [(4096, 256 * 2**20), (16, 40_000)]:  # one chunk; many small chunks
        got = retrieval_metrics(
            x, y, ks, nmi=False, use_faiss=use_faiss, batch_size=batch_size, memory_budget=budget, progress=False
        )
        assert set(got) == {*(f"recall@{k}" for k in ks), "map@r", "r_precision"}
        assert_same(got, expected)


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_ties_and_duplicates_match_brute_force_in_small_chunks(use_faiss: bool) -> None:
    # 16-dim ±1/4 vectors: scores are multiples of 1/8, so most neighbours tie; tiny chunks and memory
    # budgets force the tie-repair paths (faiss' sentinel check, torch's boundary fix) on many rows.
    x, y = tied(300, 16, 12, seed=1)
    ks = (1, 2, 4, 8)
    expected = reference_metrics(x, y, x, y, ks, leave_one_out=True)
    for batch_size, budget in [(4096, 256 * 2**20), (7, 5000)]:
        got = retrieval_metrics(
            x, y, ks, nmi=False, use_faiss=use_faiss, batch_size=batch_size, memory_budget=budget, progress=False
        )
        assert_same(got, expected)


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_hand_built_duplicates_and_ties(use_faiss: bool) -> None:
    # x0 and x1 are identical with different labels: each one's nearest *other* item is the other one.
    # Slicing off the first column would drop that duplicate for one of them instead of the query itself.
    # All remaining scores tie at 0.5 and rank by index. Worked out by hand:
    #   x0 (A): x1 B, x2 A, x3 B   -> R=1, hit at rank 2
    #   x1 (B): x0 A, x2 A, x3 B   -> R=1, hit at rank 3
    #   x2 (A): x0 A, x1 B, x3 B   -> R=1, hit at rank 1
    #   x3 (B): x0 A, x1 B, x2 A   -> R=1, hit at rank 2
    x = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, -0.5]], dtype=np.float32)
    y = np.array([0, 1, 0, 1])
    got = retrieval_metrics(x, y, (1, 2, 3), nmi=False, use_faiss=use_faiss, progress=False)
    assert got == {"recall@1": 0.25, "recall@2": 0.75, "recall@3": 1.0, "map@r": 0.25, "r_precision": 0.25}


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_classes_of_size_two_and_lone_items(use_faiss: bool) -> None:
    x, _ = clustered(101, 6, 101, noise=0.0, seed=2)
    y = np.concatenate([np.repeat(np.arange(50), 2), [99]])  # 50 pairs and one item alone in its class
    got = retrieval_metrics(x, y, (1, 3), nmi=False, use_faiss=use_faiss, progress=False)
    # With R = 1, R-precision and MAP@R both reduce to Recall@1; the lone item counts for none of them.
    assert got["r_precision"] == got["map@r"] == got["recall@1"]
    assert_same(got, reference_metrics(x, y, x, y, (1, 3), leave_one_out=True))


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_query_gallery_matches_brute_force(use_faiss: bool) -> None:
    x, y = clustered(500, 8, 50, noise=0.6, seed=3)
    g, gy = x[200:], y[200:].copy()
    gy[0] = 1000  # a class with a single gallery item and no query
    q, qy = x[:200], y[:200].copy()
    qy[:3] = [2000, 2001, 1000]  # two queries with no gallery item (excluded), one whose class has R = 1
    ks = (1, 5, 10)
    got = query_gallery_metrics(q, qy, g, gy, ks, use_faiss=use_faiss, progress=False)
    assert_same(got, reference_metrics(q, qy, g, gy, ks, leave_one_out=False))
    tied_x, tied_y = tied(200, 16, 8, seed=4)
    got = query_gallery_metrics(
        tied_x[:80], tied_y[:80], tied_x[80:], tied_y[80:], ks, use_faiss=use_faiss, progress=False
    )
    assert_same(got, reference_metrics(tied_x[:80], tied_y[:80], tied_x[80:], tied_y[80:], ks, leave_one_out=False))


def test_one_entry_point_for_both_protocols() -> None:
    """retrieval_metrics with a gallery is query_gallery_metrics; a gallery holding the queries themselves is not
    leave-one-out (each query finds itself first), so the gallery really switches the protocol."""
    x, y = clustered(300, 8, 30, noise=0.9, seed=12)
    q, qy, g, gy = x[:100], y[:100], x[100:], y[100:]
    ks = (1, 4)
    unified = retrieval_metrics(q, qy, ks, gallery_embeddings=g, gallery_labels=gy, nmi=False, progress=False)
    assert unified == query_gallery_metrics(q, qy, g, gy, ks, progress=False)
    assert_same(unified, reference_metrics(q, qy, g, gy, ks, leave_one_out=False))
    self_gallery = retrieval_metrics(x, y, ks, gallery_embeddings=x, gallery_labels=y, nmi=False, progress=False)
    assert self_gallery["recall@1"] == 1.0
    assert retrieval_metrics(x, y, ks, nmi=False, progress=False)["recall@1"] < 1.0
    with pytest.raises(ValueError, match="together"):
        retrieval_metrics(q, qy, gallery_embeddings=g, progress=False)


def test_matches_pytorch_metric_learning_accuracy_calculator() -> None:
    x, y = clustered(600, 16, 90, noise=0.8, seed=5)
    calculator = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI"),
        k="max_bin_count",  # its documented setting for exact MAP@R / R-precision
        device=torch.device("cpu"),
    )
    # Leave-one-out: no reference given, so it sets ref_includes_query=True and removes self-matches.
    theirs = calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(y))
    ours = retrieval_metrics(x, y, (1,), seed=1234, progress=False)  # 1234: faiss' default k-means seed
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-12)
    assert ours["nmi"] == pytest.approx(theirs["NMI"], abs=1e-12)

    q, qy, g, gy = x[:250], y[:250], x[250:], y[250:]
    theirs = calculator.get_accuracy(*map(torch.from_numpy, (q, qy, g, gy)), ref_includes_query=False)
    ours = query_gallery_metrics(q, qy, g, gy, (1,), nmi=True, seed=1234, progress=False)
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-12)
    assert ours["nmi"] == pytest.approx(theirs["NMI"], abs=1e-12)


def test_torch_inputs_and_backends_agree() -> None:
    x, y = clustered(500, 12, 70, noise=0.7, seed=6)
    from_numpy = retrieval_metrics(x, y, nmi=False, use_faiss=True, progress=False)
    from_torch = retrieval_metrics(torch.from_numpy(x), torch.from_numpy(y), nmi=False, use_faiss=False, progress=False)
    assert from_numpy == from_torch


@pytest.mark.parametrize("use_faiss", BACKENDS)
def test_nmi_recovers_separated_clusters(use_faiss: bool) -> None:
    x, y = clustered(300, 32, 10, noise=0.05, seed=7)
    # k-means from a random start can merge two clusters, so a perfect 1.0 is not guaranteed.
    assert cluster_nmi(x, y, seed=0, use_faiss=use_faiss) > 0.9
    shuffled = np.random.default_rng(0).permutation(y)
    assert cluster_nmi(x, shuffled, seed=0, use_faiss=use_faiss) < 0.2


def test_canonical_topk_orders_ties_by_index() -> None:
    scores = torch.from_numpy(np.random.default_rng(8).integers(0, 4, size=(64, 200)).astype(np.float32))
    got = canonical_topk(scores, 37).numpy()
    expected = np.stack([np.lexsort((np.arange(200), -row))[:37] for row in scores.numpy()])
    np.testing.assert_array_equal(got, expected)


def test_bad_inputs_fail_clearly() -> None:
    x, y = clustered(20, 4, 3, noise=0.5, seed=9)
    with pytest.raises(ValueError, match="L2-normalised"):
        retrieval_metrics(2 * x, y, progress=False)
    assert retrieval_metrics(2 * x, y, nmi=False, normalize=True, progress=False) == retrieval_metrics(
        x, y, nmi=False, progress=False
    )
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full_like(x, np.nan), y, progress=False)
    with pytest.raises(ValueError, match="one label per embedding"):
        retrieval_metrics(x, y[:-1], progress=False)
    with pytest.raises(ValueError, match="positive integers"):
        retrieval_metrics(x, y, ks=(0,), progress=False)
    with pytest.raises(ValueError, match="differ in dimension"):
        query_gallery_metrics(x, y, x[:, :2], y, normalize=True, progress=False)
    with pytest.warns(UserWarning, match="No query"):
        got = retrieval_metrics(x, np.arange(20), (1,), nmi=False, progress=False)
    assert np.isnan(got["recall@1"])
