"""The head shipped as a re-ranker: export writes ``reranker/`` next to an unchanged embedder, the ``CrossEncoder``-like
API (``predict``, ``rank``) on images, paths and stored features, and the round trip through a Hub (the local test
server): ``push`` uploads it and ``from_pretrained(repo, subfolder="reranker")`` gives the same scores."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import _hub_server
import numpy as np
import pytest
import torch
from _reranker_fixtures import gallery_images, reranking_copy, train_runs
from _training_fixtures import one_thread_fixture
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from crossmetric import CrossMetricModel, CrossMetricReranker, RerankFeatures
from crossmetric.hub.export import export_checkpoint
from crossmetric.inference.loading import load_training_checkpoint
from crossmetric.inference.reranker_loading import find_reranker

hub_server = _hub_server.hub_server  # the fixture, bound here so that pytest finds it
single_thread = pytest.fixture(autouse=True)(one_thread_fixture)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reranker")
    found = train_runs(root)
    found["reranking"] = reranking_copy(found["run"] / "model", root / "reranking")
    return found


def test_export_ships_the_reranker_next_to_an_unchanged_embedder(runs) -> None:
    export = runs["run"] / "model"
    model = load_training_checkpoint(runs["run"])  # the latest checkpoint; the export holds the selected model
    model.embedder.load_state_dict(load_file(runs["run"] / "best" / "model.safetensors"))
    with safe_open(export / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert keys == set(model.embedder.state_dict()) and not any(k.startswith("head.") for k in keys)
    exported = load_file(export / "model.safetensors")
    assert all(torch.equal(value, exported[key]) for key, value in model.embedder.state_dict().items())
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.embedder.eval()(pixels).pooler_output
        got = CrossMetricModel.from_pretrained(export).eval()(pixels).pooler_output
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    for name in ("config.json", "model.safetensors"):  # a byte copy of the run's own, chosen on validation
        assert (export / "reranker" / name).read_bytes() == (runs["run"] / "reranker" / name).read_bytes()
    reranker = CrossMetricReranker.from_pretrained(export / "reranker")
    head = load_file(runs["run"] / "best-head.safetensors")
    assert all(torch.equal(value, head[key]) for key, value in reranker.head.state_dict().items())
    card = (export / "README.md").read_text()
    assert "## Re-ranker" in card and "bytes**" in card and "rerank_top_k=20" in card
    assert "keeps the embedding's order" in card  # the tiny run's validation split shows no gain
    assert not list(export.parent.glob(".model.partial-*"))
    assert find_reranker(runs["off"] / "model") is None and not (runs["off"] / "model" / "reranker").exists()
    assert "## Re-ranker" not in (runs["off"] / "model" / "README.md").read_text()


def test_a_checkpoint_exports_an_unfused_reranker_and_says_why(runs, tmp_path) -> None:
    checkpoint = sorted((runs["run"] / "checkpoints").glob("checkpoint-*"))[-1]
    export = export_checkpoint(checkpoint, tmp_path / "export")
    reranker = CrossMetricReranker.from_pretrained(export / "reranker")
    assert not reranker.config.reranks and checkpoint.name in reranker.config.validation["reason"]
    assert checkpoint.name in (export / "README.md").read_text()
    from_run = export_checkpoint(runs["run"], tmp_path / "from-run")  # the selected model: the run's own re-ranker
    assert (from_run / "reranker" / "config.json").read_bytes() == (
        runs["run"] / "reranker" / "config.json"
    ).read_bytes()


def test_rank_and_predict_on_images_paths_and_stored_features(runs) -> None:
    paths = gallery_images(runs["shapes"])[:6]
    reranker = CrossMetricReranker.from_pretrained(runs["reranking"] / "reranker")  # its embedder: loaded lazily
    images = [Image.open(p) for p in paths]
    by_path = reranker.rank(paths[0], paths[1:])
    by_image = reranker.rank(images[0], images[1:], top_k=3)
    features = reranker.encode(paths)
    by_features = reranker.rank(
        RerankFeatures(features.embeddings[0], features.tokens[0]),
        RerankFeatures(features.embeddings[1:], features.tokens[1:]),
    )
    assert [h["corpus_id"] for h in by_image] == [h["corpus_id"] for h in by_path][:3]
    assert [h["corpus_id"] for h in by_features] == [h["corpus_id"] for h in by_path]
    assert [h["score"] for h in by_path] == sorted((h["score"] for h in by_path), reverse=True)
    scores = reranker.predict([(paths[0], p) for p in paths[1:]], score="all")
    for hit in by_path:
        i = hit["corpus_id"]
        assert hit["score"] == pytest.approx(float(scores["fused"][i]), abs=1e-5)
        assert hit["head_score"] == pytest.approx(float(scores["head"][i]), abs=1e-5)
        assert hit["score"] == pytest.approx(hit["head_score"] + 0.5 * hit["cosine"], abs=1e-5)
    stored = RerankFeatures(features.embeddings[0].numpy(), features.tokens[0].numpy().astype(np.float16))
    assert reranker.predict([(stored, paths[1])]).shape == (1,)
    with pytest.raises(ValueError, match="not a .query, candidate. pair"):
        reranker.predict([paths[0]])


def test_a_reranker_without_validation_gain_keeps_the_embedding_order_and_logs_once(runs, caplog) -> None:
    paths = gallery_images(runs["shapes"])[:8]
    reranker = CrossMetricReranker.from_pretrained(runs["run"] / "model" / "reranker")
    assert not reranker.config.reranks
    with caplog.at_level(logging.WARNING, logger="crossmetric.modeling.reranking_crossmetric"):
        first = reranker.rank(paths[0], paths[1:])
        reranker.rank(paths[0], paths[1:])
    assert [r.getMessage().startswith("re-ranker off: re-ranking did not beat") for r in caplog.records] == [True]
    cosines = [h["cosine"] for h in first]
    assert cosines == sorted(cosines, reverse=True) and [h["score"] for h in first] == cosines


def test_export_push_from_pretrained_round_trip_keeps_the_scores(runs, hub_server, monkeypatch) -> None:
    from crossmetric.cli.push import add_push_arguments, run_push
    from crossmetric.inference.reranker_loading import load_reranker

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    repo = "tester/reranker"
    parser = add_push_arguments(argparse.ArgumentParser())
    assert run_push(parser.parse_args(["--model", str(runs["reranking"]), "--repo-id", repo])) == 0
    files = hub_server.repo_files(repo)
    assert {"model.safetensors", "reranker/config.json", "reranker/model.safetensors"} <= set(files)
    assert json.loads(files["reranker/config.json"])["model_type"] == "crossmetric_reranker"

    paths = gallery_images(runs["shapes"])[:6]
    local = CrossMetricReranker.from_pretrained(runs["reranking"] / "reranker")
    remote = CrossMetricReranker.from_pretrained(repo, subfolder="reranker")  # its embedder: the repo root
    pairs = [(paths[0], p) for p in paths[1:]]
    for score in ("fused", "head", "cosine"):
        np.testing.assert_allclose(remote.predict(pairs, score=score), local.predict(pairs, score=score), atol=1e-5)
    remote_ranking, local_ranking = remote.rank(paths[0], paths[1:]), local.rank(paths[0], paths[1:])
    assert [h["corpus_id"] for h in remote_ranking] == [h["corpus_id"] for h in local_ranking]
    for key in ("score", "head_score", "cosine"):
        np.testing.assert_allclose([h[key] for h in remote_ranking], [h[key] for h in local_ranking], atol=1e-5)
    assert find_reranker(repo) == (repo, "reranker")
    found = load_reranker(find_reranker(repo))
    np.testing.assert_allclose(found.predict(pairs), local.predict(pairs), atol=1e-5)

    # the pipeline of the Hub id finds the re-ranker there and re-ranks as the local export does
    from transformers import pipeline

    from crossmetric import EmbeddingIndex

    index = EmbeddingIndex.from_folder(str(runs["reranking"]), runs["shapes"], progress=False)
    from_hub = pipeline("image-retrieval", model=repo, index=index, rerank_top_k=4, top_k=6)(str(paths[0]))
    local_hits = pipeline("image-retrieval", model=str(runs["reranking"]), index=index, rerank_top_k=4, top_k=6)(
        str(paths[0])
    )
    assert [h["id"] for h in from_hub] == [h["id"] for h in local_hits] and from_hub[0]["reranked"]
    np.testing.assert_allclose([h["score"] for h in from_hub], [h["score"] for h in local_hits], atol=1e-5)
