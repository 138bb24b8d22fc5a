"""Filters inside faiss on every kind (a filter keeping 0.1 % still returns k results, the exact ones), their
semantics and errors, and near duplicates found in a gallery with planted copies."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossmetric.retrieval.index import EmbeddingIndex

KINDS = ["exact", "hnsw", "ivf", "ivfpq"]
N = 5000  # 5 items (0.1 %) have shop "rare"


def gallery(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, dim))
    return (centres[rng.integers(0, 30, n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


@pytest.fixture(scope="module")
def indexes(tmp_path_factory) -> dict[str, EmbeddingIndex]:
    """10,000 items; ``shop`` is "rare" for every 1000th item (0.1 %), else "a"/"b"; saved and loaded per kind."""
    vectors = gallery(N)
    shops = ["rare" if i % 1000 == 0 else "ab"[i % 2] for i in range(N)]
    built = {}
    for kind in KINDS:
        fast = {"hnsw": {"hnsw_m": 16, "ef_construction": 40}}.get(kind, {})  # the filters are tested, not the graph
        index = EmbeddingIndex(vectors, [f"i{i}" for i in range(N)], [f"c{i % 7}" for i in range(N)], kind=kind,
                               metadata={"shop": shops, "year": [2000 + i % 3 for i in range(N)]}, **fast)  # fmt: skip
        built[kind] = EmbeddingIndex.load(index.save(tmp_path_factory.mktemp(kind) / "index"))
    return built


def brute_force_ids(vectors: np.ndarray, query: np.ndarray, rows: np.ndarray, k: int) -> list[str]:
    unit = vectors[rows] / np.linalg.norm(vectors[rows], axis=1, keepdims=True)
    scores = unit @ (query / np.linalg.norm(query))
    return [f"i{rows[j]}" for j in np.argsort(-scores, kind="stable")[:k]]


@pytest.mark.parametrize("kind", KINDS)
def test_a_filter_keeping_a_tenth_of_a_percent_returns_k_results(indexes, kind: str) -> None:
    index = indexes[kind]
    queries = gallery(3, seed=7)
    results = index.search(queries, k=5, filter={"shop": ["rare"]})
    rare = np.arange(0, N, 1000)
    for hits, query in zip(results, queries):
        assert len(hits) == 5 and {h["id"] for h in hits} == {f"i{r}" for r in rare}
        assert [h["id"] for h in hits] == brute_force_ids(gallery(N), query, rare, 5)
    hits = index.search(queries[0], k=5, filter={"shop": ["rare"], "label": ["c0", "c6"]})[0]  # AND across
    assert [h["id"] for h in hits] == brute_force_ids(gallery(N), queries[0], np.array([0, 1000]), 5)


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_a_broad_filter_matches_the_filtered_exact_answer(indexes, kind: str) -> None:
    """OR within a column; results are the best items that pass (exact, or within the calibrated recall)."""
    vectors, query = gallery(N), gallery(1, seed=8)[0]
    hits = indexes[kind].search(query, k=10, filter={"label": ["c1", "c2"], "year": [2001]})[0]
    rows = np.array([i for i in range(N) if i % 7 in (1, 2) and i % 3 == 1])
    assert all(h["label"] in ("c1", "c2") for h in hits) and len(hits) == 10
    truth = brute_force_ids(vectors, query, rows, 10)
    assert len({h["id"] for h in hits} & set(truth)) >= (10 if kind == "exact" else 8)


def test_filters_skip_removed_items_and_errors_name_the_column(tmp_path: Path) -> None:
    vectors = gallery(300)
    index = EmbeddingIndex(vectors, [str(i) for i in range(300)], [f"c{i % 3}" for i in range(300)],
                           metadata={"shop": ["x" if i < 5 else "y" for i in range(300)]})  # fmt: skip
    index.save(tmp_path / "index")
    index.remove(["0", "1"])
    assert {h["id"] for h in index.search(vectors[0], k=10, filter={"shop": ["x"]})[0]} == {"2", "3", "4"}
    assert index.search(vectors[0], k=5, filter={"shop": ["nowhere"]}) == [[]]
    with pytest.raises(ValueError, match=r"filter column 'colour' is not in the index.*'shop'"):
        index.search(vectors[0], filter={"colour": ["red"]})
    with pytest.raises(ValueError, match="list of allowed values"):
        index.search(vectors[0], filter={"label": "c1"})
    with pytest.raises(ValueError, match="filter 'shop'"):
        index.search(vectors[0], filter={"shop": [object()]})


@pytest.mark.parametrize("kind", KINDS)
def test_near_duplicates_finds_the_planted_copies(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((2000, 32)).astype(np.float32)
    for original, copies in ((5, (100, 1500)), (7, (1999,))):
        for copy in copies:
            vectors[copy] = vectors[original] + 0.01 * rng.standard_normal(32)
    fast = {"ivfpq": {"refine": 2}, "hnsw": {"hnsw_m": 16, "ef_construction": 40}}.get(kind, {})
    index = EmbeddingIndex(vectors, [f"i{i}" for i in range(2000)], kind=kind, **fast)
    index.save(tmp_path / "index")
    assert index.near_duplicates(0.98) == [["i5", "i100", "i1500"], ["i7", "i1999"]]
    index.remove(["i1500"])
    index.add(vectors[7:8] * 2, ["again"])  # a copy added later, in another segment
    assert index.near_duplicates(0.98) == [["i5", "i100"], ["i7", "i1999", "again"]]
    with pytest.raises(ValueError, match="between -1 and 1"):
        index.near_duplicates(1.5)
