"""The index folder, format 2: items memory-mapped (not on the heap), a version-1 folder still loads and is rewritten
as version 2 by its first change, the builder streams chunks into the same folder the constructor saves, and a
damaged folder is refused naming the file at fault."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pytest
from _index_v1 import save_v1

from crossmetric.retrieval.builder import IndexBuilder
from crossmetric.retrieval.head_tokens import HeadTokens
from crossmetric.retrieval.index import EmbeddingIndex
from crossmetric.retrieval.kinds import flat_header
from crossmetric.retrieval.storage import IndexFormatError


def vectors(n: int, dim: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_a_loaded_exact_index_keeps_its_items_in_mapped_files_not_on_the_heap(tmp_path: Path) -> None:
    n, dim = 140_000, 32  # more rows than one Arrow record batch holds (65,536): the columns come in 3 batches
    ids = [f"image-{i:06d}.jpg" for i in range(n)]
    tokens = HeadTokens.from_array(np.ones((n, 4, 8), np.float32), "stage", n)
    paths, shops = [f"/data/{i}.jpg" for i in range(n)], {"shop": [i % 4 for i in range(n)]}
    EmbeddingIndex(
        vectors(n, dim), ids, [f"c{i % 9}" for i in range(n)], paths, head_tokens=tokens, metadata=shops
    ).save(tmp_path / "index")
    arrow = pa.proxy_memory_pool(pa.default_memory_pool())  # counts what Arrow allocates from here on
    previous_pool = pa.default_memory_pool()
    pa.set_memory_pool(arrow)
    tracemalloc.start()
    index = EmbeddingIndex.load(tmp_path / "index")
    hits = index.search(vectors(5, dim, seed=1), k=10, filter={"shop": [1]})
    features = index.rerank_features([h["id"] for h in hits[0]])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    pa.set_memory_pool(previous_pool)
    assert len(hits[0]) == 10 and features[1].shape == (10, 4, 8)
    vector_bytes = n * dim * 4
    assert peak < vector_bytes / 10, peak  # no numpy copy of the vectors, tokens or ids (bitmaps are n/8 bytes)
    assert arrow.max_memory() < 1 << 20, arrow.max_memory()  # the Arrow columns are read in place, not concatenated
    flat = index.faiss_index
    assert not flat.codes.is_owned  # faiss reads its vectors from the mapped file (IO_FLAG_MMAP_IFC) ...
    assert not index.embeddings.flags.owndata  # ... and they are the embeddings re-ranking reads: one copy
    assert isinstance(index.head_tokens.tokens, np.memmap)


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_a_version_1_folder_loads_and_its_first_change_rewrites_it_as_version_2(tmp_path: Path, kind: str) -> None:
    n = 500
    tokens = HeadTokens.from_array(np.random.default_rng(2).standard_normal((n, 2, 3)), "stage", n)
    fresh = EmbeddingIndex(vectors(n), [f"v{i}" for i in range(n)], [f"c{i % 4}" for i in range(n)], kind=kind,
                           head_tokens=tokens, model={"name_or_path": "m", "fingerprint": "f"})  # fmt: skip
    folder = save_v1(fresh, tmp_path / "index")
    queries = vectors(4, seed=3)
    old = EmbeddingIndex.load(folder)
    assert old.search(queries, k=7) == fresh.search(queries, k=7)
    assert old.params == fresh.params and old.model == fresh.model and old.head_tokens_info()["shape"] == [2, 3]
    np.testing.assert_array_equal(old.rerank_features(["v3"])[1], tokens.tokens[[3]])
    old.add(vectors(2, seed=4), ["new-a", "v1"], head_tokens=np.zeros((2, 2, 3), np.float32))
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["format_version"] == 2 and meta["count"] == n + 1 and meta["removed"] == 1
    upgraded = EmbeddingIndex.load(folder)
    assert upgraded.search(queries, k=7) == old.search(queries, k=7)
    upgraded.remove(["v2"])  # the next change deletes format 1's files
    assert not (folder / "embeddings.safetensors").exists() and not (folder / "index.faiss").exists()
    assert len(EmbeddingIndex.load(folder)) == n


@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf", "ivfpq"])
def test_the_builder_streams_chunks_into_the_folder_the_constructor_saves(tmp_path: Path, kind: str) -> None:
    n = 3000
    data, ids = vectors(n, 16), [f"v{i}" for i in range(n)]
    labels, shops = [f"c{i % 5}" for i in range(n)], [f"s{i % 3}" for i in range(n)]
    tokens = np.random.default_rng(1).standard_normal((n, 2, 2)).astype(np.float16)
    chunks = [
        {"embeddings": data[a : a + 700], "ids": ids[a : a + 700], "labels": labels[a : a + 700],
         "metadata": {"shop": shops[a : a + 700]}, "head_tokens": tokens[a : a + 700]}
        for a in range(0, n, 700)
    ]  # fmt: skip
    fast = {"hnsw": {"hnsw_m": 16, "ef_construction": 40}}.get(kind, {})
    options = {"token_stage": "st", "model": {"name_or_path": "m"}, **fast}
    built = EmbeddingIndex.from_shards(tmp_path / "built", chunks, kind=kind, **options)
    queries = vectors(3, 16, seed=5)
    if kind == "exact":  # the streamed faiss file is the one faiss writes: the same answers, to the bit
        memory = EmbeddingIndex(data, ids, labels, metadata={"shop": shops}, head_tokens=HeadTokens(tokens, "st"))
        assert built.search(queries, k=10) == memory.search(queries, k=10)
        written = (tmp_path / "built" / "index-000001.faiss").read_bytes()
        assert written == faiss.serialize_index(memory.faiss_index).tobytes()
    else:
        calibration = built.calibration  # the search setting was measured on the built index
        assert built.params[calibration["parameter"]] == calibration["value"] and calibration["queries"] == 256
    if kind in ("ivf", "ivfpq"):  # lists read from disk, without faiss' 32 prefetch threads per search
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(built.segments[0].index).invlists)
        assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.prefetch_nthread == 0
    assert built.records(["v42"]) == [{"id": "v42", "label": "c2", "path": None, "shop": "s0"}]
    np.testing.assert_array_equal(built.rerank_features(["v2999", "v0"])[1], tokens[[2999, 0]])
    assert built.info()["count"] == n and built.model == {"name_or_path": "m"}
    assert built.search(queries, k=5, filter={"shop": ["s1"]})[0][0]["id"] in {f"v{i}" for i in range(1, n, 3)}


def test_the_builder_refuses_repeated_ids_and_leaves_no_folder(tmp_path: Path) -> None:
    builder = IndexBuilder(tmp_path / "index")
    builder.append(vectors(3), ["a", "b", "c"])
    builder.append(vectors(2, seed=1), ["d", "b"])
    with pytest.raises(ValueError, match="'b' appears in rows 1 and 4"):
        builder.finish()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="metadata column"), IndexBuilder(tmp_path / "index") as builder:
        builder.append(vectors(2), ["a", "b"], metadata={"shop": ["x", "y"]})
        builder.append(vectors(2), ["c", "d"], metadata={"colour": ["x", "y"]})
    assert list(tmp_path.iterdir()) == []


def test_flat_header_is_the_one_faiss_writes() -> None:
    index = faiss.IndexFlatIP(7)
    index.add(vectors(11, 7))
    assert faiss.serialize_index(index).tobytes()[:45] == flat_header(7, 11)


def test_a_damaged_version_2_folder_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = EmbeddingIndex(vectors(50), [str(i) for i in range(50)], kind="hnsw").save(tmp_path / "index")
    other = EmbeddingIndex(vectors(60), [str(i) for i in range(60)], kind="hnsw").save(tmp_path / "other")
    (folder / "embeddings-000001.npy").write_bytes((other / "embeddings-000001.npy").read_bytes())
    with pytest.raises(IndexFormatError, match=r"embeddings-000001\.npy holds an array of shape \(60, 32\)"):
        EmbeddingIndex.load(folder)
    (folder / "items-000001.arrow").unlink()
    with pytest.raises(IndexFormatError, match=r"items-000001\.arrow is missing"):
        EmbeddingIndex.load(folder)
    meta = json.loads((other / "metadata.json").read_text())
    (other / "metadata.json").write_text(json.dumps({**meta, "rows": 61}))
    with pytest.raises(IndexFormatError, match="the segments hold 60 rows but rows=61"):
        EmbeddingIndex.load(other)
