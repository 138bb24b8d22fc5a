"""retrieval/ivfpq.py with real faiss: the sizing rule, training, the on-disk lists merged from shards, re-scoring."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest

from crossmetric.retrieval.ivfpq import (
    IVFPQLayout,
    ivfpq_layout,
    parse_memory,
    read_ondisk,
    search_refined,
    train_ivf,
    training_sample_size,
    write_ondisk,
)

COUNT, DIM = 4000, 32


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((40, DIM))
    x = (centres[rng.integers(0, 40, COUNT)] + 0.35 * rng.standard_normal((COUNT, DIM))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def trained(data: np.ndarray) -> faiss.Index:
    faiss.omp_set_num_threads(1)
    return train_ivf(data, ivfpq_layout(COUNT, DIM, "1G"))


def test_merged_on_disk_index_searches_like_the_same_index_in_memory(tmp_path, data, trained):
    ids = np.arange(COUNT, dtype=np.int64) * 3 + 7  # global rows need not start at 0 nor be contiguous
    chunks = [(data[i : i + 700], ids[i : i + 700]) for i in range(0, COUNT, 700)]
    path = write_ondisk(trained, iter(chunks), tmp_path, "index-0", shard_items=1500)  # several shards merged
    assert path == tmp_path / "index-0.faiss"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index-0.faiss", "index-0.ivfdata"]  # no shards left
    layout = ivfpq_layout(COUNT, DIM, "1G")
    assert (tmp_path / "index-0.ivfdata").stat().st_size == layout.list_bytes(COUNT)
    assert trained.ntotal == 0  # the trained index is reused, not filled

    on_disk = read_ondisk(path)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(on_disk).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)
    assert lists.prefetch_nthread == 0  # faiss' default 32 threads per search cost more than the scan
    assert on_disk.ntotal == COUNT
    in_memory = faiss.clone_index(trained)
    in_memory.add_with_ids(data, ids)
    for index in (on_disk, in_memory):
        faiss.extract_index_ivf(index).nprobe = 8
    got_scores, got_ids = on_disk.search(data[:50], 10)
    want_scores, want_ids = in_memory.search(data[:50], 10)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, rtol=1e-6)
    assert set(np.unique(got_ids)) <= set(ids)


def test_the_on_disk_index_reads_from_a_moved_folder(tmp_path, data, trained):
    write_ondisk(trained, [(data, np.arange(COUNT))], tmp_path / "a", "index-0")
    (tmp_path / "a").rename(tmp_path / "b")  # the lists are found beside the index, not at the path it was built at
    index = read_ondisk(tmp_path / "b" / "index-0.faiss")
    faiss.extract_index_ivf(index).nprobe = 4
    _, found = index.search(data[:5], 1)
    assert (found[:, 0] >= 0).all()
    (tmp_path / "b" / "index-0.ivfdata").unlink()
    with pytest.raises(FileNotFoundError, match="index-0.ivfdata"):
        read_ondisk(tmp_path / "b" / "index-0.faiss")


def test_refined_scores_are_exact_and_find_the_true_neighbours(tmp_path, data, trained):
    path = write_ondisk(trained, [(data, np.arange(COUNT))], tmp_path, "index-0")
    index = read_ondisk(path)
    embeddings = np.lib.format.open_memmap(tmp_path / "embeddings.npy", "w+", np.float16, data.shape)
    embeddings[:] = data
    queries = data[:40] + 0.01
    every_list = faiss.SearchParametersIVF(nprobe=faiss.extract_index_ivf(index).nlist)
    scores, rows = search_refined(index, embeddings, queries, 10, refine=10, params=every_list)
    exact = queries @ embeddings.astype(np.float32).T
    np.testing.assert_allclose(scores, np.take_along_axis(exact, rows, axis=1), rtol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    truth = np.argsort(-exact, axis=1)[:, :10]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)])
    assert recall >= 0.97
    # a callable gives the same result
    scores2, rows2 = search_refined(index, lambda r: embeddings[r], queries, 10, params=every_list)
    np.testing.assert_array_equal(rows2, rows)


def test_chunks_of_the_wrong_shape_are_named(tmp_path, data, trained):
    with pytest.raises(ValueError, match="chunk 1: 10 vectors but ids"):
        write_ondisk(trained, [(data[:10], np.arange(10)), (data[:10], np.arange(9))], tmp_path, "x")
    with pytest.raises(ValueError, match="chunk 0: vectors must be N × 32"):
        write_ondisk(trained, [(data[:10, :16], np.arange(10))], tmp_path, "x")
    assert not (tmp_path / "x.faiss").exists()


@pytest.mark.parametrize("count", [10_000, 10**6, 10**7, 10**9])
def test_the_layout_fits_the_budget_and_grows_with_the_count(count):
    layout = ivfpq_layout(count, 128, "64G")
    assert layout.nlist & (layout.nlist - 1) == 0  # a power of two
    assert 2 * math.sqrt(count) <= layout.nlist <= 8 * math.sqrt(count)  # 4·sqrt(N) rounded in log scale
    assert layout.list_bytes(count) + layout.fixed_bytes(128) <= parse_memory("64G")
    assert layout.code_size <= 32  # at least four dimensions per sub-quantiser
    built = faiss.index_factory(128, layout.factory, faiss.METRIC_INNER_PRODUCT)
    assert faiss.extract_index_ivf(built).nlist == layout.nlist


def test_a_smaller_budget_gives_smaller_codes_and_too_small_a_budget_says_how_much_is_needed():
    sizes = [ivfpq_layout(10**7, 128, budget).code_size for budget in ("2G", "600M", "300M", "150M")]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
    assert ivfpq_layout(10**7, 128, "2G") == IVFPQLayout(16384, 32, False, "IVF16384,PQ32x8")
    assert ivfpq_layout(10**7, 128, "200M").opq  # 8 bytes for 128 dimensions: rotate first
    with pytest.raises(ValueError, match="max_memory=.*pass a larger --max_memory"):
        ivfpq_layout(10**9, 128, "2G")
    with pytest.raises(ValueError, match="at least 16 items"):
        ivfpq_layout(10, 128, "2G")
    assert training_sample_size(ivfpq_layout(10**7, 128, "2G"), 10**7) == 64 * 16384
    assert training_sample_size("IVF64,PQ8", 1000) == 1000


def test_parse_memory_reads_units_and_names_bad_input():
    assert parse_memory("2G") == 2 * 1024**3
    assert parse_memory("512m") == 512 * 1024**2
    assert parse_memory("1.5GiB") == int(1.5 * 1024**3)
    assert parse_memory("64KB") == 64 * 1024
    assert parse_memory(1000) == 1000
    for bad in ("2X", "", "G", "-1G", "two"):
        with pytest.raises(ValueError, match=f"max_memory {bad!r}"):
            parse_memory(bad)
    with pytest.raises(ValueError, match="at least one byte"):
        parse_memory("0")


def test_many_lists_are_filled_through_the_fast_assigner_and_still_search_well(tmp_path, monkeypatch, data):
    import crossmetric.retrieval.ivfpq_assign as assign

    monkeypatch.setattr(assign, "FAST_ASSIGN_MIN_NLIST", 16)
    monkeypatch.setattr(assign, "ASSIGN_NPROBE", 2)  # 2 of 8 groups of centroids: approximate
    calls = []
    original = assign.GroupAssigner.assign
    monkeypatch.setattr(assign.GroupAssigner, "assign", lambda self, x: calls.append(len(x)) or original(self, x))
    trained = train_ivf(data, "IVF64,PQ8x4")
    path = write_ondisk(trained, [(data, np.arange(COUNT))], tmp_path, "index-0")
    assert sum(calls) == COUNT  # every vector went through the group assigner
    index = read_ondisk(path)
    assert index.ntotal == COUNT
    exact = faiss.clone_index(trained)  # the same centroids, every vector in its best list
    exact.add_with_ids(data, np.arange(COUNT))
    lists = faiss.extract_index_ivf(index).invlists
    sizes = np.array([lists.list_size(i) for i in range(64)])
    best = np.array([faiss.extract_index_ivf(exact).invlists.list_size(i) for i in range(64)])
    assert sizes.sum() == COUNT and np.abs(sizes - best).sum() <= 0.1 * COUNT  # nearly every vector in its best list
    embeddings = data.astype(np.float16)
    params = faiss.SearchParametersIVF(nprobe=8)
    _, rows = search_refined(index, embeddings, data[:100], 10, params=params)
    truth = np.argsort(-(data[:100] @ data.T), axis=1)[:, :10]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)]) >= 0.9


def test_a_calibration_that_never_reaches_its_target_probes_every_list_and_says_what_to_change(data, trained, caplog):
    from crossmetric.retrieval.ivfpq_kind import calibrate_nprobe

    built = faiss.clone_index(trained)
    built.add_with_ids(data, np.arange(COUNT, dtype=np.int64))
    nlist = faiss.extract_index_ivf(built).nlist
    reachable = calibrate_nprobe(built, data, refine=20, target=0.5, sample=64)
    assert reachable["value"] < nlist and reachable["recall"] >= 0.5 and not caplog.records
    record = calibrate_nprobe(built, data, refine=1, target=1.01, sample=64)  # no index reaches recall 1.01
    assert record["value"] == nlist and record["recall"] < 1.01
    assert "pass a larger --refine" in caplog.text
