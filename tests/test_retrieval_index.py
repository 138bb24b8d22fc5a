"""EmbeddingIndex: exact search against numpy, approximate recall, pickle-free save/load and its checks, the Hub,
building from folders and datasets (the multi-process build under a real ``accelerate launch``: test_index_build.py)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from _hub_server import hub_server  # noqa: F401 - pytest fixture
from _index_v1 import save_v1
from _retrieval_fixtures import brute_force, embed_reference, export_tiny_model, make_class_folder
from safetensors.numpy import save_file

import crossmetric.retrieval.segments as retrieval_segments
from crossmetric.retrieval.index import EmbeddingIndex
from crossmetric.retrieval.storage import IndexFormatError

REPO_ROOT = Path(__file__).resolve().parents[1]


def random_vectors(n: int, dim: int, seed: int = 0, clusters: int | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if clusters is None:
        return rng.standard_normal((n, dim)).astype(np.float32)
    centres = rng.standard_normal((clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.7 * rng.standard_normal((n, dim))).astype(np.float32)


def make_index(n: int = 400, dim: int = 16, kind: str = "exact", seed: int = 0) -> EmbeddingIndex:
    vectors = random_vectors(n, dim, seed)
    ids = [f"item-{i}" for i in range(n)]
    labels = [f"class-{i % 7}" for i in range(n)]
    paths = [f"/data/{i}.jpg" for i in range(n)]
    return EmbeddingIndex(vectors, ids, labels, paths, kind=kind)


# -- search -----------------------------------------------------------------------------------------------------
def test_exact_search_equals_numpy_brute_force() -> None:
    vectors = random_vectors(500, 24, seed=1) * 3.0  # not normalised: the index normalises
    index = EmbeddingIndex(vectors, [f"v{i}" for i in range(500)], [str(i % 5) for i in range(500)])
    queries = random_vectors(9, 24, seed=2)
    rows, scores = brute_force(vectors, queries, k=10)
    results = index.search(queries, k=10)
    assert len(results) == 9
    for hits, expected_rows, expected_scores in zip(results, rows, scores):
        assert [h["id"] for h in hits] == [f"v{r}" for r in expected_rows]
        assert [h["label"] for h in hits] == [str(r % 5) for r in expected_rows]
        np.testing.assert_allclose([h["score"] for h in hits], expected_scores, atol=1e-5)
        assert all(h["path"] is None for h in hits)
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-6)


def test_single_query_and_k_larger_than_the_index() -> None:
    index = make_index(n=6, dim=8)
    results = index.search(index.embeddings[2], k=50)  # a 1-D query
    assert len(results) == 1 and len(results[0]) == 6
    assert results[0][0]["id"] == "item-2" and results[0][0]["score"] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ids": ["a", "b", "a"]}, "unique"),
        ({"ids": ["a", "b"]}, "ids has 2 entries"),
        ({"labels": ["x"]}, "labels has 1 entries"),
        ({"embeddings": np.zeros((3, 4))}, "all zeros"),
        ({"embeddings": np.full((3, 4), np.nan)}, "NaN"),
        ({"kind": "lsh"}, "kind='lsh'"),
    ],
)
def test_bad_construction_input_is_refused_clearly(kwargs: dict, message: str) -> None:
    arguments = {"embeddings": np.eye(3, 4), "ids": ["a", "b", "c"], **kwargs}
    with pytest.raises(ValueError, match=message):
        EmbeddingIndex(**arguments)


def test_query_of_the_wrong_dimension_is_refused() -> None:
    with pytest.raises(ValueError, match="dimension 5 but this index holds dimension 8"):
        make_index(n=10, dim=8).search(np.ones((1, 5)))


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
@pytest.mark.parametrize("data", ["clustered", "gaussian"])
def test_approximate_recall_at_10_of_the_exact_index(kind: str, data: str) -> None:
    """Calibrated approximate indexes keep >= 0.95 of the exact top 10 for held-out queries (3k vectors, dim 64)."""
    clusters = 60 if data == "clustered" else None
    both = random_vectors(3200, 64, seed=3, clusters=clusters)
    vectors, queries = both[:3000], both[3000:]
    ids = [str(i) for i in range(3000)]
    _, truth = EmbeddingIndex(vectors, ids).search_arrays(queries, 10)
    approximate = EmbeddingIndex(vectors, ids, kind=kind)
    _, found = approximate.search_arrays(queries, 10)
    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found.tolist(), truth.tolist())])
    assert recall >= 0.95, (kind, data, approximate.params, recall)
    assert approximate.calibration["recall"] >= 0.95
    if kind == "ivf":  # calibration must not simply fall back to visiting every list on clustered data
        assert data == "gaussian" or approximate.params["nprobe"] < approximate.params["nlist"]


def test_explicit_search_settings_skip_calibration_and_per_call_overrides_apply() -> None:
    vectors = random_vectors(1000, 32, seed=4)
    index = EmbeddingIndex(vectors, [str(i) for i in range(1000)], kind="ivf", nlist=20, nprobe=1)
    assert index.calibration is None and index.params == {"nlist": 20, "nprobe": 1}
    queries = random_vectors(50, 32, seed=5)
    _, exact_rows = EmbeddingIndex(vectors, [str(i) for i in range(1000)]).search_arrays(queries, 10)
    _, all_lists = index.search_arrays(queries, 10, nprobe=20)  # visiting all lists is exhaustive
    np.testing.assert_array_equal(all_lists, exact_rows)
    assert index.faiss_index.nprobe == 1  # the override did not change the shared index


# -- save / load ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivf"])
def test_save_load_round_trip_gives_identical_results(tmp_path: Path, kind: str) -> None:
    index = make_index(n=800, dim=16, kind=kind)
    index.model = {"name_or_path": "some/model", "embedding_dim": 16}
    index.save(tmp_path / "index")
    # format 2 (one segment): an exact index keeps its vectors only in its faiss file, IVF adds its on-disk lists
    expected = ["idhash-000001.npy", "index-000001.faiss", "items-000001.arrow", "metadata.json"]
    expected += {"exact": [], "hnsw": ["embeddings-000001.npy"]}.get(
        kind, ["embeddings-000001.npy", "index-000001.ivfdata", "trained-000000.faiss"]
    )
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == sorted(expected)
    loaded = EmbeddingIndex.load(tmp_path / "index")
    queries = random_vectors(20, 16, seed=9)
    assert loaded.search(queries, k=7) == index.search(queries, k=7)
    assert (loaded.kind, loaded.params, loaded.calibration, loaded.model) == (
        kind,
        index.params,
        index.calibration,
        index.model,
    )
    assert loaded.ids == index.ids and loaded.labels == index.labels and loaded.paths == index.paths
    assert [p.name for p in tmp_path.iterdir()] == ["index"]  # no staging folder left behind


def _edit_metadata(folder: Path, **changes) -> None:
    meta = json.loads((folder / "metadata.json").read_text())
    meta.update(changes)
    (folder / "metadata.json").write_text(json.dumps(meta))


def test_mismatched_files_are_refused_with_the_file_named(tmp_path: Path) -> None:
    """Format 1's checks (a folder written as before format 2); format 2's are in test_index_storage.py."""
    folder = save_v1(make_index(n=30, dim=8), tmp_path / "index")
    meta = json.loads((folder / "metadata.json").read_text())

    grown = {key: meta[key] + [f"extra-{key}"] for key in ("ids", "labels", "paths")}
    _edit_metadata(folder, count=31, **grown)
    with pytest.raises(IndexFormatError, match=r"embeddings\.safetensors holds float32 embeddings of shape \(30, 8\)"):
        EmbeddingIndex.load(folder)

    _edit_metadata(folder, **{**meta, "ids": meta["ids"][:29]})
    with pytest.raises(IndexFormatError, match=r"metadata\.json: ids has 29 entries but count is 30"):
        EmbeddingIndex.load(folder)

    _edit_metadata(folder, **meta)
    save_file({"embeddings": random_vectors(30, 8, seed=7) / 10}, str(folder / "embeddings.safetensors"))
    with pytest.raises(IndexFormatError, match="not L2-normalised"):
        EmbeddingIndex.load(folder)

    other = save_v1(make_index(n=30, dim=8, seed=11), tmp_path / "other")  # same shape, other vectors
    (folder / "embeddings.safetensors").write_bytes((other / "embeddings.safetensors").read_bytes())
    with pytest.raises(IndexFormatError, match=r"index\.faiss holds other vectors than"):
        EmbeddingIndex.load(folder)

    (folder / "index.faiss").write_bytes(
        (save_v1(make_index(n=31, dim=8), tmp_path / "x") / "index.faiss").read_bytes()
    )
    with pytest.raises(IndexFormatError, match=r"index\.faiss holds 31 vectors of dimension 8"):
        EmbeddingIndex.load(folder)

    (folder / "index.faiss").unlink()
    with pytest.raises(IndexFormatError, match=r"index\.faiss is missing"):
        EmbeddingIndex.load(folder)

    _edit_metadata(other, format_version=99)
    with pytest.raises(IndexFormatError, match="format_version 99"):
        EmbeddingIndex.load(other)


def test_kind_in_metadata_must_match_the_faiss_file(tmp_path: Path) -> None:
    folder = make_index(n=50, dim=8, kind="exact").save(tmp_path / "index")
    _edit_metadata(folder, kind="hnsw")
    with pytest.raises(IndexFormatError, match="is a IndexFlat.*kind='hnsw'"):
        EmbeddingIndex.load(folder)


def test_an_interrupted_save_leaves_the_previous_index_readable(tmp_path: Path, monkeypatch) -> None:
    first = make_index(n=40, dim=8, seed=1)
    first.save(tmp_path / "index")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the process were stopped half-way through writing

    monkeypatch.setattr(retrieval_segments, "write_table", crash)
    with pytest.raises(KeyboardInterrupt):
        make_index(n=60, dim=8, seed=2).save(tmp_path / "index")
    loaded = EmbeddingIndex.load(tmp_path / "index")
    assert loaded.ids == first.ids
    np.testing.assert_array_equal(loaded.embeddings, first.embeddings)
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


# -- Hub --------------------------------------------------------------------------------------------------------
def test_hub_round_trip_next_to_the_model(tmp_path: Path, hub_server, monkeypatch) -> None:  # noqa: F811
    from crossmetric.hub.push import push_to_hub_folder

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    repo = "tester/retrieval"
    model_dir = export_tiny_model(tmp_path / "model")
    push_to_hub_folder(model_dir, repo)
    index = make_index(n=120, dim=16, kind="hnsw")
    commit = index.push_to_hub(repo, path_in_repo="index")
    files = hub_server.repo_files(repo)
    assert {"config.json", "model.safetensors", "index/metadata.json", "index/index-000001.faiss"} <= set(files)
    assert commit.oid

    hub_server.requests.clear()
    loaded = EmbeddingIndex.from_pretrained(repo)  # finds index/ by itself
    queries = random_vectors(5, 16, seed=3)
    assert loaded.search(queries, k=5) == index.search(queries, k=5)
    downloaded = [r.path for r in hub_server.requests if "/resolve/" in r.path]
    assert downloaded and not [p for p in downloaded if "model.safetensors" in p]  # only the index files

    root_repo = "tester/index-only"
    index.push_to_hub(root_repo)
    assert "metadata.json" in hub_server.repo_files(root_repo)
    assert EmbeddingIndex.from_pretrained(root_repo).search(queries, k=3) == index.search(queries, k=3)
    with pytest.raises(FileNotFoundError, match="holds no embedding index"):
        EmbeddingIndex.from_pretrained(root_repo, subfolder="elsewhere")
    with pytest.raises(ValueError, match="relative folder path"):
        index.push_to_hub(repo, path_in_repo="../escape")


# -- building from images ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("retrieval")
    return export_tiny_model(root / "model"), make_class_folder(root / "images", classes=3, per_class=4, broken=True)


def test_from_folder_skips_unreadable_files_and_matches_plain_embedding(model_and_images, caplog) -> None:
    model_dir, images = model_and_images
    index = EmbeddingIndex.from_folder(model_dir, images, batch_size=5, progress=False)
    assert len(index) == 12 and "class_0/broken.jpg" not in index.ids
    assert "broken.jpg" in caplog.text
    assert index.ids[:2] == ["class_0/0.png", "class_0/1.png"]
    assert index.labels == [f"class_{c}" for c in range(3) for _ in range(4)]
    assert index.paths[0] == str(images / "class_0" / "0.png")
    expected = embed_reference(model_dir, [Path(p) for p in index.paths])
    np.testing.assert_allclose(index.embeddings, expected, atol=1e-5)
    assert index.model["fingerprint"] and index.model["embedding_dim"] == 32


def test_from_dataset_uses_class_names_and_id_column(model_and_images) -> None:
    model_dir, images = model_and_images
    files = sorted(str(p) for p in images.rglob("*.png"))
    names = sorted({Path(f).parent.name for f in files})
    dataset = datasets.Dataset.from_dict(
        {
            "image": files,
            "label": [names.index(Path(f).parent.name) for f in files],
            "key": [f"k{i}" for i in range(12)],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.ClassLabel(names=names), "key": datasets.Value("string")}
        ),
    )
    index = EmbeddingIndex.from_dataset(model_dir, dataset, id_column="key", progress=False)
    assert index.ids == [f"k{i}" for i in range(12)]
    assert index.labels == [Path(f).parent.name for f in files] and index.paths == files
    folder_index = EmbeddingIndex.from_folder(model_dir, images, progress=False)
    np.testing.assert_allclose(index.embeddings, folder_index.embeddings, atol=1e-6)
