"""``crossmetric serve --rerank_top_k K`` against a real uvicorn process: ``/search`` re-ranks as ``crossmetric search
--rerank_top_k`` and ``CrossMetricReranker.rank()`` do, with dynamic batching, a reloaded index checked for head
tokens, and the refusals (ONNX backend, an index without head tokens) before any model is loaded.

The model is the tiny re-ranker run of ``_reranker_fixtures`` (``test_resnet``, its re-ranker set to re-rank with
alpha 0.5, as ``test_rerank_retrieval.py`` does); the index is built with its head tokens.
"""

from __future__ import annotations

import re
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest
from _fault_helpers import run_cli
from _reranker_fixtures import expected_rerank_order, gallery_images, reranking_copy, train_runs
from _retrieval_fixtures import write_image
from _serve_fixtures import Server, burst, call, json_body, multipart
from _training_fixtures import one_thread_fixture

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from crossmetric import EmbeddingIndex  # noqa: E402
from crossmetric.retrieval.search import search_images  # noqa: E402

K = 5
TOP = 9
single_thread = pytest.fixture(autouse=True)(one_thread_fixture)


@pytest.fixture(scope="module")
def reranking(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-rerank")
    runs = train_runs(root)
    export = reranking_copy(runs["run"] / "model", root / "export")
    EmbeddingIndex.from_folder(str(export), runs["shapes"], head_tokens=True, progress=False).save(root / "index")
    plain = EmbeddingIndex.from_folder(str(export), runs["shapes"], head_tokens=False, progress=False)
    plain.save(root / "plain")
    return SimpleNamespace(root=root, export=export, shapes=runs["shapes"], index=root / "index", plain=root / "plain")


def _in_process(setup: SimpleNamespace, queries: list, index=None) -> list[list[dict]]:
    """What ``crossmetric search --rerank_top_k K --top_k TOP`` gives for ``queries`` (the reference)."""
    return search_images(str(setup.export), str(index or setup.index), list(map(str, queries)), TOP,
                         device="cpu", rerank_top_k=K)  # fmt: skip


def _same_hits(served: list[dict], expected: list[dict]) -> None:
    assert [h["id"] for h in served] == [h["id"] for h in expected]
    assert [h["reranked"] for h in served] == [h["reranked"] for h in expected]
    for name in ("score", "cosine"):
        np.testing.assert_allclose([h[name] for h in served], [h[name] for h in expected], atol=1e-5, rtol=0)
    heads = [(h["head_score"], e["head_score"]) for h, e in zip(served, expected)]
    assert all((a is None) == (b is None) and (a is None or abs(a - b) <= 1e-5) for a, b in heads), heads


def _batch_passes(port: int) -> tuple[float, float]:
    text = call(port, "GET", "/metrics").body.decode()
    values = [re.search(rf"^crossmetric_batch_size_{n} ([0-9.e+-]+)$", text, re.M) for n in ("count", "sum")]
    return tuple(float(v.group(1)) if v else 0.0 for v in values)  # type: ignore[return-value]


def test_search_reranks_as_search_and_rank_do_batched_and_after_a_reload(reranking, tmp_path) -> None:
    queries = gallery_images(reranking.shapes)[::13][:4]
    server = Server(["--model", str(reranking.export), "--index", str(reranking.index), "--rerank_top_k", str(K),
                     "--index_poll_interval", "0.3", "--max_wait_ms", "50"])  # fmt: skip
    try:
        port = server.port
        info = call(port, "GET", "/info").json()
        assert info["rerank_top_k"] == K and info["reranker_loaded"] is True and info["reranker"]["alpha"] == 0.5
        expected = _in_process(reranking, queries)
        # 4 clients at once, one query each: each answer as the in-process search, from shared forward passes
        passes, images = _batch_passes(port)
        sent = [q.read_bytes() for q in queries] * 3
        answers = burst(lambda i: call(port, "POST", f"/search?k={TOP}", *json_body([sent[i]])), len(sent), len(sent))
        assert [a.status for a in answers] == [200] * len(sent), [a.body[:200] for a in answers]
        for i, answer in enumerate(answers):
            _same_hits(answer.json()[0], expected[i % len(queries)])
        after_passes, after_images = _batch_passes(port)
        assert after_images - images == len(sent) and after_passes - passes < len(sent)  # some passes held several
        # one request with all the queries (one batch, tokens sliced per image), as a multipart upload
        body, headers = multipart([(q.name, q.read_bytes()) for q in queries])
        together = call(port, "POST", f"/search?k={TOP}", body, headers).json()
        changed = 0
        index = EmbeddingIndex.load(reranking.index)
        for query, hits, reference in zip(queries, together, expected):
            _same_hits(hits, reference)
            reranked, embedding_order = expected_rerank_order(index, reranking.export, query, K, TOP)
            assert [h["id"] for h in hits[:K]] == reranked and [h["id"] for h in hits[K:]] == embedding_order[K:]
            assert set(hits[0]) >= {"id", "label", "score", "path"}
            changed += reranked != embedding_order[:K]
        assert changed  # the re-ranker did reorder something: the comparison checks a real re-ranking
        # a rebuild without head tokens is refused (the previous index kept); one with them is served, re-ranked
        size = info["index"]["size"]
        EmbeddingIndex.load(reranking.plain).save(reranking.index)  # an atomic swap, as `index build` does
        deadline = time.monotonic() + 30
        while "could not be loaded" not in server.read_output():
            assert time.monotonic() < deadline, server.read_output()[-2000:]
        assert "holds no head tokens" in server.read_output()
        still = call(port, "POST", f"/search?k={TOP}", *json_body([queries[0].read_bytes()])).json()
        _same_hits(still[0], expected[0])
        gallery = tmp_path / "gallery"
        shutil.copytree(reranking.shapes, gallery)
        for i in range(3):
            write_image(gallery / "class_99" / f"{i}.png", seed=500 + i, size=(40, 40))
        EmbeddingIndex.from_folder(str(reranking.export), gallery, head_tokens=True, progress=False).save(
            reranking.index
        )
        while call(port, "GET", "/info").json()["index"]["size"] != size + 3:
            assert time.monotonic() < deadline + 30, "the server did not pick up the rebuilt index"
            time.sleep(0.1)
        fresh = call(port, "POST", f"/search?k={TOP}", *json_body([queries[1].read_bytes()])).json()
        _same_hits(fresh[0], _in_process(reranking, queries[1:2])[0])
        embedded = call(port, "POST", "/embed", *json_body([queries[0].read_bytes()])).json()  # /embed: unchanged
        assert len(embedded) == 1 and len(embedded[0]) == info["embedding_dim"]
    finally:
        assert server.stop() in (0, -15)


def test_rerank_top_k_is_refused_before_loading_with_onnx_or_an_index_without_head_tokens(
    reranking, capsys, monkeypatch
) -> None:
    import crossmetric.serve.model_adapter as adapter
    import crossmetric.serve.server as server_module

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    for name in ("check_model", "load_served_model"):
        monkeypatch.setattr(adapter, name, no_work)
    monkeypatch.setattr(server_module, "run_server", no_work)
    model = str(reranking.export)
    code, err = run_cli(capsys, "serve", "--model", model, "--rerank_top_k", str(K), "--backend", "onnx")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--rerank_top_k needs --backend torch: the ONNX graph outputs the embedding only" in err
    monkeypatch.undo()
    monkeypatch.setattr(adapter, "load_served_model", no_work)
    monkeypatch.setattr(server_module, "run_server", no_work)
    code, err = run_cli(capsys, "serve", "--model", model, "--index", str(reranking.plain), "--rerank_top_k", str(K))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "the index holds no head tokens to re-rank with" in err
    code, err = run_cli(capsys, "serve", "--model", model, "--index", str(reranking.index), "--rerank_top_k", "1")
    assert code == 2 and "--rerank_top_k must be between 2" in err
