"""Retrieve, then re-rank: ``index build`` stores the head's tokens in float16, ``search --rerank_top_k`` and the
``image-retrieval`` pipeline re-rank the K nearest in the order ``CrossMetricReranker.rank`` gives, items past K keep
the embedding's order, and a model without a re-ranker is refused by every re-rank option before any work."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from _reranker_fixtures import expected_rerank_order, gallery_images, reranking_copy, train_runs
from _training_fixtures import one_thread_fixture
from transformers import pipeline

from crossmetric import CrossMetricReranker, EmbeddingIndex
from crossmetric.cli.index import add_index_build_arguments, run_index_build
from crossmetric.cli.main import main
from crossmetric.cli.search import add_search_arguments, run_search
from crossmetric.retrieval.pipeline import register_retrieval_pipeline

K = 5
TOP = 9
single_thread = pytest.fixture(autouse=True)(one_thread_fixture)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    register_retrieval_pipeline()
    root = tmp_path_factory.mktemp("rerank-retrieval")
    runs = train_runs(root)
    export = reranking_copy(runs["run"] / "model", root / "export")
    parser = add_index_build_arguments(argparse.ArgumentParser())
    args = [
        "--model",
        str(export),
        "--images",
        str(runs["shapes"]),
        "--output_dir",
        str(root / "index"),
        "--no-progress",
    ]
    assert run_index_build(parser.parse_args(args)) == 0
    return {**runs, "root": root, "export": export, "index": EmbeddingIndex.load(root / "index")}


def _search(setup: dict, capsys, *extra: str) -> int:
    parser = add_search_arguments(argparse.ArgumentParser())
    return run_search(
        parser.parse_args(["--model", str(setup["export"]), "--index", str(setup["root"] / "index"), *extra])
    )


def test_the_index_stores_each_items_head_tokens_in_float16(setup) -> None:
    index = setup["index"]
    meta = json.loads((setup["root"] / "index" / "metadata.json").read_text())["head_tokens"]
    count, channels = meta["shape"]
    assert index.head_tokens.tokens.dtype == np.float16 and index.head_tokens.tokens.shape == (
        len(index),
        count,
        channels,
    )
    assert meta["bytes_per_item"] == count * channels * 2 and meta["dtype"] == "float16"
    reranker = CrossMetricReranker.from_pretrained(setup["export"] / "reranker")
    assert meta["token_stage"] == reranker.config.token_stage
    features = reranker.encode([index.paths[0], index.paths[-1]])
    np.testing.assert_allclose(
        index.head_tokens.tokens[[0, -1]].astype(np.float32), features.tokens, atol=2e-3, rtol=1e-3
    )
    np.testing.assert_allclose(index.embeddings[[0, -1]], features.embeddings, atol=1e-5)


def test_search_and_pipeline_rerank_the_k_nearest_as_rank_does_and_keep_the_rest(setup, capsys) -> None:
    queries = gallery_images(setup["shapes"])[::13][:4]
    retrieve = pipeline("image-retrieval", model=str(setup["export"]), index=str(setup["root"] / "index"))
    capsys.readouterr()
    assert _search(setup, capsys, *map(str, queries), "--top_k", str(TOP), "--rerank_top_k", str(K), "--json") == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    changed = 0
    for query, line in zip(queries, printed):
        reranked, embedding_order = expected_rerank_order(setup["index"], setup["export"], query, K, TOP)
        from_pipeline = retrieve(str(query), top_k=TOP, rerank_top_k=K)
        for hits in (line["results"], from_pipeline):
            assert [h["id"] for h in hits[:K]] == reranked
            assert [h["id"] for h in hits[K:]] == embedding_order[K:]  # past K: the embedding's order
            assert all(h["reranked"] for h in hits[:K]) and not any(h["reranked"] for h in hits[K:])
            assert [h["score"] for h in hits[K:]] == [h["cosine"] for h in hits[K:]]
        plain = retrieve(str(query), top_k=TOP)
        assert [h["id"] for h in plain] == embedding_order
        changed += reranked != embedding_order[:K]
    assert changed  # the head did reorder something: the test checks a real re-ranking


def test_every_rerank_option_refuses_a_model_without_a_reranker_before_any_work(setup, capsys, monkeypatch) -> None:
    import transformers

    import crossmetric.data.dml_dataset as datasets_module

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    off, query = setup["off"] / "model", str(gallery_images(setup["shapes"])[0])
    expected = "--rerank_top_k needs a re-ranker"
    with monkeypatch.context() as patched:
        patched.setattr(transformers, "pipeline", no_work)
        patched.setattr(datasets_module, "load_dml_dataset", no_work)
        index = str(setup["root"] / "index")
        assert main(["search", "--model", str(off), "--index", index, query, "--rerank_top_k", "4"]) == 2
        assert expected in capsys.readouterr().err
        for model in (off, setup["off"]):  # the export, and the run folder
            out = setup["root"] / "eval-off"
            rc = main(["evaluate", "--model", str(model), "--dataset", str(setup["shapes"]), "--rerank_top_k", "4",
                       "--output_dir", str(out), "--no-progress"])  # fmt: skip
            assert rc == 2 and not out.exists() and expected in capsys.readouterr().err
        rc = main(["search", "--model", str(setup["export"]), "--index", index, query, "--rerank_top_k", "4",
                   "--backend", "onnx"])  # fmt: skip
        err = capsys.readouterr().err
        assert rc == 2 and "--rerank_top_k needs --backend torch" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="rerank_top_k needs a re-ranker"):
        pipeline("image-retrieval", model=str(off), index=str(setup["root"] / "index"), rerank_top_k=4)
    retrieve = pipeline("image-retrieval", model=str(off), index=str(setup["root"] / "index"))
    monkeypatch.setattr(type(retrieve), "preprocess", no_work)
    with pytest.raises(ValueError, match="rerank_top_k needs a re-ranker"):
        retrieve(query, rerank_top_k=4)
    with pytest.raises(ValueError, match="head_tokens=True needs a re-ranker"):
        EmbeddingIndex.from_folder(str(off), setup["shapes"], head_tokens=True, progress=False)


def test_an_index_without_head_tokens_is_refused_for_reranking(setup, tmp_path) -> None:
    plain = EmbeddingIndex.from_folder(str(setup["export"]), setup["shapes"], head_tokens=False, progress=False)
    assert plain.head_tokens is None
    plain.save(tmp_path / "plain")
    with pytest.raises(ValueError, match="holds no head tokens"):
        pipeline("image-retrieval", model=str(setup["export"]), index=str(tmp_path / "plain"), rerank_top_k=4)
    with pytest.raises(ValueError, match="rerank_top_k must be an integer >= 2"):
        pipeline("image-retrieval", model=str(setup["export"]), index=str(setup["root"] / "index"), rerank_top_k=1)
