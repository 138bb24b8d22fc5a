"""The ``image-retrieval`` pipeline through ``transformers.pipeline`` and the ``index build`` / ``search`` CLI,
checked against a brute-force numpy search over embeddings computed the plain way."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _retrieval_fixtures import brute_force, embed_reference, export_tiny_model, make_class_folder, write_image
from transformers import pipeline

from crossmetric.cli.index import add_index_build_arguments, run_index_build
from crossmetric.cli.search import add_search_arguments, run_search
from crossmetric.retrieval.index import EmbeddingIndex
from crossmetric.retrieval.pipeline import (
    ImageRetrievalPipeline,
    add_retrieval_pipeline_to_config,
    register_retrieval_pipeline,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    register_retrieval_pipeline()
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = export_tiny_model(root / "model")
    images = make_class_folder(root / "images", classes=3, per_class=5)
    index = EmbeddingIndex.from_folder(model_dir, images, progress=False)
    index.save(root / "index")
    queries = [write_image(root / "queries" / f"q{i}.jpg", seed=900 + i, size=(60, 45)) for i in range(3)]
    embedded = dict(zip(queries, embed_reference(model_dir, queries)))  # the model run by hand, once
    return {
        "root": root,
        "model": model_dir,
        "images": images,
        "index": index,
        "queries": queries,
        "embedded": embedded,
    }


def expected_hits(setup: dict, query: Path, k: int) -> tuple[list[str], np.ndarray]:
    """Ids and scores of the brute-force top ``k`` for ``query``, from the model run by hand."""
    rows, scores = brute_force(setup["index"].embeddings, setup["embedded"][Path(query)][None], k)
    return [setup["index"].ids[r] for r in rows[0]], scores[0]


def assert_same(hits: list[dict], ids: list[str], scores: np.ndarray, index: EmbeddingIndex) -> None:
    assert [h["id"] for h in hits] == ids
    np.testing.assert_allclose([h["score"] for h in hits], scores, atol=1e-5)
    rows = [index.ids.index(i) for i in ids]
    assert [h["label"] for h in hits] == [index.labels[r] for r in rows]
    assert [h["path"] for h in hits] == [index.paths[r] for r in rows]


def test_pipeline_returns_the_brute_force_neighbours(setup: dict) -> None:
    retrieve = pipeline(
        "image-retrieval", device="cpu", model=str(setup["model"]), index=str(setup["root"] / "index"), top_k=5
    )
    assert isinstance(retrieve, ImageRetrievalPipeline)
    query = setup["queries"][0]
    ids, scores = expected_hits(setup, query, 5)
    assert_same(retrieve(str(query)), ids, scores, setup["index"])

    batch = retrieve([str(q) for q in setup["queries"]], top_k=3, batch_size=2)  # per-call top_k, batched forward
    assert len(batch) == 3
    for query, hits in zip(setup["queries"], batch):
        ids, scores = expected_hits(setup, query, 3)
        assert_same(hits, ids, scores, setup["index"])


def test_an_indexed_image_finds_itself_first(setup: dict) -> None:
    retrieve = pipeline(
        "image-retrieval", device="cpu", model=str(setup["model"]), index=setup["index"]
    )  # an index object
    hits = retrieve(str(setup["images"] / "class_2" / "3.png"))
    assert len(hits) == 5  # default top_k
    assert hits[0]["id"] == "class_2/3.png" and hits[0]["label"] == "class_2"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_pipeline_finds_the_index_shipped_in_the_model_folder(setup: dict, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(setup["model"], model_dir)
    with pytest.raises(ValueError, match="needs an index: pass index="):
        pipeline("image-retrieval", device="cpu", model=str(model_dir))
    setup["index"].save(model_dir / "index")
    retrieve = pipeline("image-retrieval", device="cpu", model=str(model_dir), top_k=4)
    ids, scores = expected_hits(setup, setup["queries"][1], 4)
    assert_same(retrieve(str(setup["queries"][1])), ids, scores, setup["index"])


def test_an_index_of_another_model_is_refused_naming_both(setup: dict, tmp_path: Path) -> None:
    other = export_tiny_model(tmp_path / "wide", embedding_dim=16)
    with pytest.raises(ValueError, match="16-dimensional embeddings but the model makes 32"):
        pipeline(
            "image-retrieval",
            device="cpu",
            model=str(setup["model"]),
            index=EmbeddingIndex.from_folder(other, setup["images"]),
        )
    same_size = export_tiny_model(tmp_path / "reseeded", seed=1)
    with pytest.raises(ValueError, match="built with .* but the query comes from .*reseeded"):
        pipeline("image-retrieval", device="cpu", model=str(same_size), index=setup["index"])


def test_bad_arguments_and_unreadable_queries_fail_clearly(setup: dict) -> None:
    retrieve = pipeline("image-retrieval", device="cpu", model=str(setup["model"]), index=setup["index"])
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        retrieve(str(setup["queries"][0]), top_k=0)
    with pytest.raises(TypeError, match="unexpected keyword arguments: \\['topk'\\]"):
        retrieve(str(setup["queries"][0]), topk=3)
    broken = setup["root"] / "broken.jpg"
    broken.write_bytes(b"GIF89a but not really")
    with pytest.raises(ValueError, match="broken.jpg' could not be decoded"):
        retrieve(str(broken))


def test_custom_pipelines_entry_lets_remote_code_users_infer_the_task(setup: dict, tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(setup["model"], model_dir)
    add_retrieval_pipeline_to_config(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["custom_pipelines"]["image-retrieval"] == {
        "impl": "crossmetric_retrieval_pipeline.ImageRetrievalPipeline",
        "pt": ["AutoModel"],
        "tf": [],
        "type": "image",
    }
    assert config["model_type"] == "crossmetric" and "auto_map" in config  # the rest of the config is kept
    retrieve = pipeline(
        model=str(model_dir), index=setup["index"], top_k=3, trust_remote_code=True, device="cpu"
    )  # task inferred
    assert type(retrieve).__name__ == "ImageRetrievalPipeline"
    ids, scores = expected_hits(setup, setup["queries"][2], 3)
    assert_same(retrieve(str(setup["queries"][2])), ids, scores, setup["index"])
    # The trade-off documented in add_retrieval_pipeline_to_config: transformers then asks for trust_remote_code.
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        pipeline("image-retrieval", device="cpu", model=str(model_dir), index=setup["index"])


def _parse(add_arguments, argv: list[str]) -> argparse.Namespace:
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_cli_build_then_search_prints_the_pipeline_results(setup: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli-index"
    argv = ["--model", str(setup["model"]), "--images", str(setup["images"]), "--output_dir", str(out)]
    assert run_index_build(_parse(add_index_build_arguments, [*argv, "--kind", "hnsw", "--device", "cpu"])) == 0
    assert "saved to" in capsys.readouterr().out
    built = EmbeddingIndex.load(out)
    assert built.kind == "hnsw" and built.ids == setup["index"].ids
    np.testing.assert_allclose(built.embeddings, setup["index"].embeddings, atol=1e-5)

    queries = [str(q) for q in setup["queries"][:2]]
    argv = ["--model", str(setup["model"]), "--index", str(out), "--top_k", "4", "--json", "--device", "cpu"]
    assert run_search(_parse(add_search_arguments, [*argv, *queries])) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == queries
    for line in lines:
        ids, scores = expected_hits(setup, Path(line["query"]), 4)
        assert_same(line["results"], ids, scores, setup["index"])

    assert run_search(_parse(add_search_arguments, [*argv[:4], "--device", "cpu", queries[0]])) == 0
    text = capsys.readouterr().out
    assert text.startswith(queries[0]) and "  1. " in text and "[class_" in text


def test_cli_bad_input_exits_2_before_any_work(setup: dict, tmp_path: Path, capsys) -> None:
    build = ["--model", str(setup["model"]), "--output_dir", str(tmp_path / "x")]
    assert run_index_build(_parse(add_index_build_arguments, [*build, "--images", str(tmp_path / "nope")])) == 2
    assert "no such folder" in capsys.readouterr().err
    assert (
        run_index_build(_parse(add_index_build_arguments, [*build[2:], "--model", str(tmp_path), "--images", "."])) == 2
    )
    assert "has no config.json" in capsys.readouterr().err
    search = ["--model", str(setup["model"]), "--index", str(setup["root"] / "index")]
    assert run_search(_parse(add_search_arguments, [*search, str(tmp_path / "missing.jpg")])) == 2
    assert "query image(s) not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
