"""EmbeddingIndex keeps working after faiss.contrib.torch_utils (imported by pytorch-metric-learning) patches faiss."""

from __future__ import annotations

import faiss.contrib.torch_utils  # noqa: F401  (the patch under test)
import numpy as np

from crossmetric import EmbeddingIndex


def test_per_call_search_settings_survive_the_torch_utils_patch() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [str(i) for i in range(300)]
    exact = EmbeddingIndex(vectors, ids)
    hnsw = EmbeddingIndex(vectors, ids, kind="hnsw", ef_search=64)
    expected = np.argsort(-(vectors[:5] @ vectors.T), axis=1)[:, :3]
    assert [[int(r["id"]) for r in row] for row in exact.search(vectors[:5], k=3)] == expected.tolist()
    found = hnsw.search(vectors[:5], k=3, ef_search=128)
    assert [row[0]["id"] for row in found] == ["0", "1", "2", "3", "4"]
