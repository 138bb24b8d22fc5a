"""Changing a saved index: add (upsert by id), remove, compact on every kind, persisted atomically in its folder; a
removed id never comes back; another model's embeddings are refused; a kill between writing the files and swapping
the manifest leaves the previous index readable (a real SIGKILL at the ``index_change`` fault point)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from _fault_helpers import Process, cli_env

from crossmetric.retrieval.index import EmbeddingIndex

KINDS = ["exact", "hnsw", "ivf", "ivfpq"]


def clustered(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, dim))
    return (centres[rng.integers(0, 20, n)] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


def build(folder: Path, kind: str, n: int = 1200) -> EmbeddingIndex:
    vectors = clustered(n)
    index = EmbeddingIndex(vectors, [f"item-{i}" for i in range(n)], [f"class-{i % 5}" for i in range(n)], kind=kind,
                           model={"name_or_path": "org/model-a", "fingerprint": "aaa"})  # fmt: skip
    index.save(folder)
    return index


def all_ids(index: EmbeddingIndex, query: np.ndarray) -> list[str]:
    """Every id a search can return (k = the whole index)."""
    return [hit["id"] for hit in index.search(query, k=len(index) + 10)[0]]


@pytest.mark.parametrize("kind", KINDS)
def test_add_upsert_remove_compact_persist_and_removed_ids_never_come_back(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "index"
    index = build(folder, kind)
    new = clustered(30, seed=5)
    index.add(new[:20], [f"new-{i}" for i in range(19)] + ["item-3"], labels=["fresh"] * 20)  # item-3: upsert
    assert len(index) == 1200 + 19 and index.info()["removed"] == 1
    hit = index.search(new[19], k=1)[0][0]
    assert hit["id"] == "item-3" and hit["label"] == "fresh" and hit["score"] == pytest.approx(1.0, abs=1e-3)
    assert index.records(["item-3", "nope"]) == [{"id": "item-3", "label": "fresh", "path": None}, None]

    removed = index.remove(["item-10", "new-0", "item-10", "unknown"])
    assert removed == 2 and len(index) == 1217
    reloaded = EmbeddingIndex.load(folder)  # every change was written to the folder
    query = clustered(3, seed=9)
    assert reloaded.search(query, k=8) == index.search(query, k=8)
    assert reloaded.records(["item-10", "new-0", "new-1"])[:2] == [None, None]
    for gone in ("item-10", "new-0"):
        assert gone not in all_ids(reloaded, index.embeddings[0])
    assert all_ids(reloaded, query[0]).count("item-3") == 1  # the upserted id once, with its new vector

    before = reloaded.search(query, k=8)
    reloaded.compact()
    assert reloaded.info()["removed"] == 0 and reloaded.info()["segments"] == 1 and len(reloaded) == 1217
    compacted = EmbeddingIndex.load(folder)
    assert [h["id"] for h in compacted.search(query, k=8)[0]] == [h["id"] for h in before[0]] or kind != "exact"
    for gone in ("item-10", "new-0"):
        assert gone not in all_ids(compacted, query[0])
    files = {p.name for p in folder.iterdir()}
    compacted.remove(["item-1"])  # a later change deletes the files no manifest names any more
    assert len({p.name for p in folder.iterdir()} - files) <= 3
    assert "items-000001.arrow" not in {p.name for p in folder.iterdir()}


def test_another_models_embeddings_are_refused_naming_both(tmp_path: Path) -> None:
    index = build(tmp_path / "index", "exact", n=60)
    with pytest.raises(ValueError, match=r"'org/model-b'.*'org/model-a'"):
        index.add(clustered(2), ["x", "y"], model={"name_or_path": "org/model-b", "fingerprint": "bbb"})
    index.add(clustered(2), ["x", "y"], model={"name_or_path": "org/model-a", "fingerprint": "aaa"})
    with pytest.raises(ValueError, match="dimension 8 but this index holds dimension 16"):
        index.add(np.ones((1, 8)), ["z"])
    with pytest.raises(ValueError, match="unique"):
        index.add(clustered(2), ["p", "p"])
    assert len(EmbeddingIndex.load(tmp_path / "index")) == 62


def test_a_writer_with_a_stale_view_is_refused(tmp_path: Path) -> None:
    first = build(tmp_path / "index", "exact", n=50)
    second = EmbeddingIndex.load(tmp_path / "index")
    second.remove(["item-1"])
    with pytest.raises(RuntimeError, match="changed by another writer"):
        first.remove(["item-2"])
    assert EmbeddingIndex.load(tmp_path / "index").records(["item-1", "item-2"])[0] is None


def test_in_memory_index_changes_then_saves(tmp_path: Path) -> None:
    index = EmbeddingIndex(clustered(100), [str(i) for i in range(100)], kind="hnsw")
    index.remove(["5"])
    index.add(clustered(3, seed=2), ["a", "b", "5"])
    assert len(index) == 102 and index.folder is None
    index.save(tmp_path / "index")
    assert EmbeddingIndex.load(tmp_path / "index").search(clustered(2, seed=3), k=4) == index.search(
        clustered(2, seed=3), k=4
    )


_CHANGE = """
import sys, numpy as np
from crossmetric.retrieval.index import EmbeddingIndex
index = EmbeddingIndex.load(sys.argv[1])
if sys.argv[2] == "add":
    index.add(np.ones((3, 16), np.float32), ["late-0", "late-1", "item-0"])
elif sys.argv[2] == "remove":
    index.remove(["item-1", "item-2"])
else:
    index.compact()
print("DONE", flush=True)
"""


def test_a_kill_between_writing_files_and_swapping_the_manifest_leaves_the_previous_index(tmp_path: Path) -> None:
    folder = tmp_path / "index"
    build(folder, "hnsw", n=300)
    EmbeddingIndex.load(folder).remove(["item-5"])  # so that compaction has work
    manifest = (folder / "metadata.json").read_bytes()
    query = clustered(2, seed=4)
    expected = EmbeddingIndex.load(folder).search(query, k=6)
    script = tmp_path / "change.py"
    script.write_text(_CHANGE)
    for change in ("add",):  # remove and compact take the same path (new files, then the manifest); one import
        process = Process([sys.executable, str(script), str(folder), change],
                          cli_env(CROSSMETRIC_TEST_PAUSE="index_change:1:120"))  # fmt: skip
        process.wait_for("CROSSMETRIC_TEST_PAUSE index_change #1", timeout=240)
        process.kill()
        assert (folder / "metadata.json").read_bytes() == manifest  # the swap never happened
        loaded = EmbeddingIndex.load(folder)
        assert loaded.search(query, k=6) == expected and len(loaded) == 299
    orphans = {p.name for p in folder.iterdir()} - set(json.loads(manifest)["segments"][0]["files"])
    assert any(name.startswith("items-") for name in orphans)  # the killed changes' files are there ...
    index = EmbeddingIndex.load(folder)
    index.remove(["item-7"])  # ... until the next change cleans them up
    names = {p.name for p in folder.iterdir()}
    assert not [n for n in names if n.startswith("items-") and n != "items-000001.arrow"]
    assert len(EmbeddingIndex.load(folder)) == 298


@pytest.mark.parametrize("kind", ["exact", "ivf"])
def test_removing_everything_and_compacting_leaves_an_empty_index_that_takes_new_items(tmp_path: Path, kind) -> None:
    index = build(tmp_path / "index", kind, n=200)
    index.remove([f"item-{i}" for i in range(200)])
    index.compact()
    empty = EmbeddingIndex.load(tmp_path / "index")
    assert len(empty) == 0 and empty.search(clustered(1), k=3) == [[]] and empty.near_duplicates(0.5) == []
    empty.add(clustered(2, seed=8), ["a", "b"])
    assert [h["id"] for h in EmbeddingIndex.load(tmp_path / "index").search(clustered(2, seed=8)[0], k=5)[0]] == [
        "a",
        "b",
    ]
