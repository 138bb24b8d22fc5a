"""``crossmetric index add | remove | compact | info | duplicates`` on a real index folder, through the command line.

A tiny exported model and real image files; each test changes its own copy of one built index. Results are checked
against what the index then answers (search, info), not against the commands' own messages only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _fault_helpers import run_cli, tree_digest
from _retrieval_fixtures import embed_reference, export_tiny_model, make_class_folder, write_image

from crossmetric.retrieval.build import build_index_sharded
from crossmetric.retrieval.index import EmbeddingIndex


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A model, a 12-image gallery (3 classes) with one planted copy (``class_2/copy.png`` = ``class_0/0.png``)."""
    base = tmp_path_factory.mktemp("index_cli")
    model = export_tiny_model(base / "model")
    images = make_class_folder(base / "images", classes=3, per_class=4)
    shutil.copy(images / "class_0" / "0.png", images / "class_2" / "copy.png")
    index = base / "index"
    build_index_sharded(str(model), str(images), index, batch_size=13, device="cpu", progress=False)
    return {"base": base, "model": model, "images": images, "index": index}


@pytest.fixture
def index_copy(built: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(built["index"], tmp_path / "index"))


def _run(capsys, *argv: object) -> tuple[int, str, str]:
    """``crossmetric ARGV`` in this process: exit code, stdout, stderr (which holds no traceback)."""
    from crossmetric.cli import main as cli

    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _nearest(index: Path, query: np.ndarray, k: int = 20) -> list[str]:
    return [hit["id"] for hit in EmbeddingIndex.load(index).search(query, k=k)[0]]


def test_info_reports_kind_count_removed_bytes_and_model(built: dict[str, Path], index_copy: Path, capsys) -> None:
    code, out, err = _run(capsys, "index", "info", "--index", index_copy, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "exact" and info["count"] == 13 and info["removed"] == 0
    on_disk = sum(p.stat().st_size for p in index_copy.rglob("*") if p.is_file())
    assert 0 < info["bytes_on_disk"] <= on_disk
    assert info["model"]["name_or_path"] == str(built["model"])
    code, out, _ = _run(capsys, "index", "info", "--index", index_copy)
    assert code == 0 and "kind: exact" in out and "count: 13" in out and "removed: 0" in out


def test_add_embeds_with_the_index_model_and_replaces_an_existing_id(
    built: dict[str, Path], index_copy: Path, tmp_path: Path, capsys
) -> None:
    new = tmp_path / "new"
    write_image(new / "class_9" / "0.png", seed=900)
    write_image(new / "class_9" / "1.png", seed=901)
    write_image(new / "class_0" / "1.png", seed=902)  # an id the index holds: replaced (upsert)
    code, out, err = _run(capsys, "index", "add", "--index", index_copy, "--images", new, "--no-progress")
    assert code == 0, err
    assert "added 3 items" in out and "(1 replaced an item of the same id); 15 now" in out
    index = EmbeddingIndex.load(index_copy)
    assert len(index) == 15 and index.info()["removed"] == 1  # the replaced row awaits compaction
    queries = embed_reference(built["model"], [new / "class_9" / "0.png", new / "class_0" / "1.png"])
    results = index.search(queries, k=1)
    assert [r[0]["id"] for r in results] == ["class_9/0.png", "class_0/1.png"]
    assert results[0][0]["label"] == "class_9" and results[1][0]["score"] == pytest.approx(1.0, abs=1e-5)
    old = embed_reference(built["model"], [built["images"] / "class_0" / "1.png"])
    assert "class_0/1.png" not in [h["id"] for h in index.search(old, k=15)[0] if h["score"] > 0.99999]


def test_add_refuses_another_model_naming_both_before_embedding(
    built: dict[str, Path], index_copy: Path, tmp_path: Path, capsys
) -> None:
    other = export_tiny_model(tmp_path / "other", seed=1)
    new = tmp_path / "new"
    write_image(new / "a" / "0.png", seed=5)
    before = tree_digest(index_copy)
    code, err = run_cli(capsys, "index", "add", "--index", str(index_copy), "--images", str(new), "--model", str(other))
    assert code == 2
    assert str(other) in err and str(built["model"]) in err and "not the model that built the index" in err
    assert tree_digest(index_copy) == before


def test_remove_by_ids_and_file_then_compact(built: dict[str, Path], index_copy: Path, tmp_path: Path, capsys) -> None:
    argv = ["index", "remove", "--index", str(index_copy)]
    code, out, err = _run(capsys, *argv, "--ids", "class_0/0.png", "class_1/2.png", "no/such.png")
    assert code == 0, err
    assert "removed 2 items" in out and "(1 ids were not in it); 11 left" in out
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("class_2/copy.png\n\n  class_1/2.png  \n")  # one new, one already removed, a blank line
    code, err = run_cli(capsys, *argv, "--ids_file", str(ids_file))
    assert code == 0, err
    gone = {"class_0/0.png", "class_1/2.png", "class_2/copy.png"}
    query = embed_reference(built["model"], [built["images"] / "class_0" / "0.png"])
    before = _nearest(index_copy, query)
    assert len(before) == 10 and not gone & set(before)
    assert EmbeddingIndex.load(index_copy).info()["removed"] == 3

    code, out, err = _run(capsys, "index", "compact", "--index", index_copy)
    assert code == 0, err
    assert "10 items, 3 removed rows" in out and "-> 10 items, 0 removed rows" in out
    info = EmbeddingIndex.load(index_copy).info()
    assert info["count"] == 10 and info["removed"] == 0
    assert _nearest(index_copy, query) == before  # compaction changes no result


def test_remove_without_ids_is_a_usage_error(index_copy: Path, capsys) -> None:
    code, _ = run_cli(capsys, "index", "remove", "--index", str(index_copy))
    assert code == 2
    code, err = run_cli(capsys, "index", "remove", "--index", str(index_copy), "--ids_file", "/no/such/file")
    assert code == 2 and "--ids_file '/no/such/file': no such file" in err


def test_duplicates_finds_the_planted_copy(index_copy: Path, tmp_path: Path, capsys) -> None:
    output = tmp_path / "groups.jsonl"
    argv = ["index", "duplicates", "--index", str(index_copy), "--threshold", "0.999", "--output", str(output)]
    code, err = run_cli(capsys, *argv)
    assert code == 0, err
    groups = [json.loads(line) for line in output.read_text().splitlines()]
    assert [sorted(g["ids"]) for g in groups] == [["class_0/0.png", "class_2/copy.png"]]
    assert groups[0]["size"] == 2 and {i["label"] for i in groups[0]["items"]} == {"class_0", "class_2"}
    assert "1 groups of near duplicates (2 items)" in err
    code, err = run_cli(capsys, "index", "duplicates", "--index", str(index_copy), "--threshold", "2")
    assert code == 2 and "--threshold is a cosine similarity between -1 and 1" in err
