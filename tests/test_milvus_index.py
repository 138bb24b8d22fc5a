"""The gallery in Milvus (``MilvusIndex``) against the real Milvus Lite engine, on 300 real images, a tiny real model.

In-process Milvus Lite (``*.db`` files): FLAT equals the folder's exact index, changes are seen by the next search,
filters (with quotes and brackets in the values), re-ranking, another model refused. Subprocesses: ``crossmetric
index build / search / serve --milvus``, and a 2-process ``accelerate launch`` build into a ``milvus-lite server`` on
127.0.0.1 (started and stopped here), against a 1-process build and after a killed build.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pymilvus", reason='Milvus tests need the milvus extra: pip install "crossmetric[milvus]"')
pytest.importorskip("milvus_lite", reason='Milvus tests need the milvus extra: pip install "crossmetric[milvus]"')

from _fault_helpers import cli_env  # noqa: E402
from _retrieval_fixtures import brute_force, make_class_folder, write_image  # noqa: E402
from _serve_fixtures import Server, free_port, multipart  # noqa: E402
from _serve_fixtures import call as http_call  # noqa: E402
from _training_fixtures import TINY_MODEL, one_thread  # noqa: E402

from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning  # noqa: E402
from crossmetric.inference.loaded_model import LoadedModel  # noqa: E402
from crossmetric.retrieval.gallery import embed_gallery  # noqa: E402
from crossmetric.retrieval.index import EmbeddingIndex  # noqa: E402
from crossmetric.retrieval.milvus_expressions import filter_expression  # noqa: E402
from crossmetric.retrieval.milvus_index import GRPC_OPTIONS, MilvusIndex  # noqa: E402
from crossmetric.retrieval.search import search_images  # noqa: E402

CLASSES, PER_CLASS = 10, 30  # 300 gallery images
TRICKY = ['a"b]', "it's", 'x"] or label != "', "back\\slash", "tab\there", "new\nline", "é☃", "['", '"]) or (id != "']


def export_with_reranker(directory: Path, seed: int) -> Path:
    """An untrained tiny model with the head, exported with its re-ranker (``reranks`` on, so the order changes)."""
    torch.manual_seed(seed)
    config = CrossMetricConfig(**TINY_MODEL, image_size=32)
    model = CrossMetricForMetricLearning(config).eval()
    reranker = model.to_reranker(alpha=0.5, reranks=True)
    return model.save_embedder(directory, write_extra=lambda staging: reranker.save_pretrained(staging / "reranker"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("milvus")
    with one_thread():
        model = export_with_reranker(root / "model", seed=0)
        images = make_class_folder(root / "images", classes=CLASSES, per_class=PER_CLASS)
        queries = [write_image(root / "queries" / f"q{i}.png", seed=50_000 + i) for i in range(12)]
        gallery = embed_gallery(str(model), str(images), progress=False)
        loaded = LoadedModel.load(model, rerank=True)
        query_embeddings, _ = loaded.embed(queries)
    folder = EmbeddingIndex.from_gallery(gallery, "exact")
    shape = list(gallery.head_tokens.tokens.shape[1:])
    tokens = {"shape": shape, "token_stage": gallery.head_tokens.token_stage}
    flat = MilvusIndex.create(str(root / "lite.db"), "flat", dim=folder.dim, model=gallery.model,
                              index_type="FLAT", head_tokens=tokens)  # fmt: skip
    flat.add(gallery.embeddings, gallery.ids, gallery.labels, gallery.paths, head_tokens=gallery.head_tokens,
             model=gallery.model)  # fmt: skip
    return {"root": root, "model": model, "images": images, "queries": queries, "gallery": gallery,
            "folder": folder, "flat": flat, "loaded": loaded, "query_embeddings": query_embeddings,
            "tokens": tokens}  # fmt: skip


def ids_of(results: list[list[dict]]) -> list[list[str]]:
    return [[hit["id"] for hit in hits] for hits in results]


def test_flat_collection_gives_the_folder_exact_indexs_top_10(setup: dict) -> None:
    flat, folder, queries = setup["flat"], setup["folder"], setup["query_embeddings"]
    assert len(flat) == CLASSES * PER_CLASS
    got, expected = flat.search(queries, k=10), folder.search(queries, k=10)
    assert ids_of(got) == ids_of(expected)
    scores = np.array([[hit["score"] for hit in hits] for hits in got])
    np.testing.assert_allclose(scores, [[hit["score"] for hit in hits] for hits in expected], atol=1e-4)
    assert got[0][0]["label"] == expected[0][0]["label"] and got[0][0]["path"] == expected[0][0]["path"]


def test_add_remove_and_upsert_are_seen_by_the_next_search(setup: dict) -> None:
    gallery = setup["gallery"]
    index = MilvusIndex.create(str(setup["root"] / "lite.db"), "changes", dim=16, model=gallery.model,
                               index_type="FLAT", head_tokens=setup["tokens"])  # fmt: skip
    tokens = gallery.head_tokens.tokens
    index.add(gallery.embeddings[:50], gallery.ids[:50], gallery.labels[:50], head_tokens=tokens[:50])
    probe = gallery.embeddings[60:61]
    assert index.search(probe, k=1)[0][0]["id"] != gallery.ids[60]
    index.add(probe, [gallery.ids[60]], ["new"], head_tokens=tokens[60:61])  # add
    hit = index.search(probe, k=1)[0][0]
    assert (hit["id"], hit["label"], len(index)) == (gallery.ids[60], "new", 51)
    index.add(probe, [gallery.ids[0]], ["moved"], head_tokens=tokens[60:61])  # upsert: id 0 now holds image 60
    top = index.search(probe, k=2)[0]
    assert {h["id"] for h in top} == {gallery.ids[0], gallery.ids[60]} and len(index) == 51
    assert index.records([gallery.ids[0]])[0]["label"] == "moved"
    assert index.remove([gallery.ids[60], gallery.ids[0], "never there"]) == 2  # remove
    assert len(index) == 49
    assert {h["id"] for h in index.search(probe, k=49)[0]}.isdisjoint({gallery.ids[0], gallery.ids[60]})
    assert index.records([gallery.ids[60]]) == [None]


def test_a_filter_is_applied_inside_the_search(setup: dict) -> None:
    gallery, flat, queries = setup["gallery"], setup["flat"], setup["query_embeddings"]
    allowed = {"class_3", "class_7"}
    got = flat.search(queries, k=10, filter={"label": sorted(allowed)})
    keep = np.array([label in allowed for label in gallery.labels])
    rows, scores = brute_force(gallery.embeddings[keep], queries, 10)
    kept_ids = np.array(gallery.ids)[keep]
    assert ids_of(got) == [[kept_ids[r] for r in row] for row in rows]
    np.testing.assert_allclose([[h["score"] for h in hits] for hits in got], scores, atol=1e-4)
    assert flat.search(queries[:1], k=5, filter={"label": []}) == [[]]
    with pytest.raises(ValueError, match="'colour' is not a column of the index"):
        flat.search(queries, k=5, filter={"colour": ["red"]})


def test_labels_and_ids_with_quotes_and_brackets_stay_values(setup: dict) -> None:
    gallery = setup["gallery"]
    index = MilvusIndex.create(str(setup["root"] / "lite.db"), "tricky", dim=16, model=gallery.model,
                               index_type="FLAT", metadata_columns={"source": "VARCHAR"})  # fmt: skip
    count = 2 * len(TRICKY)
    ids = [f"{value}#{i}" for i, value in enumerate(TRICKY * 2)]
    labels = TRICKY + ["plain"] * len(TRICKY)
    sources = ["web"] * len(TRICKY) + TRICKY
    index.add(gallery.embeddings[:count], ids, labels, metadata={"source": sources})
    query = gallery.embeddings[:1]
    for i, value in enumerate(TRICKY):
        assert [h["id"] for h in index.search(query, k=count, filter={"label": [value]})[0]] == [ids[i]]
        assert [h["id"] for h in index.search(query, k=count, filter={"source": [value]})[0]] == [ids[len(TRICKY) + i]]
    both = index.search(query, k=count, filter={"label": ["plain"], "source": [TRICKY[0], TRICKY[3]]})[0]
    assert {h["id"] for h in both} == {ids[len(TRICKY)], ids[len(TRICKY) + 3]}
    # a value written to close the string and the list early matches nothing instead of everything
    assert index.search(query, k=count, filter={"label": ['"] or label != "']})[0] == []
    assert filter_expression({"label": ['a"b]']}, ["label"]) == '(label in ["a\\"b]"])'
    assert [r["label"] for r in index.records(ids[:3])] == TRICKY[:3]
    assert index.remove([ids[0], ids[1]]) == 2 and len(index) == count - 2


def test_metadata_columns_of_every_type_filter_with_text_values_converted(setup: dict) -> None:
    from crossmetric.retrieval.filter_spec import parse_filter_specs, typed_filter

    columns = {"year": "INT64", "ok": "BOOL", "weight": "DOUBLE", "maker": "VARCHAR"}
    index = MilvusIndex.create(str(setup["root"] / "lite.db"), "typed", dim=16, index_type="FLAT",
                               metadata_columns=columns)  # fmt: skip
    metadata = {"year": [2020, 2021, None, 2020], "ok": [True, False, True, None], "weight": [1.5, 2.0, None, 0.25],
                "maker": ["x", None, "y", 'z"]']}  # fmt: skip
    index.add(setup["gallery"].embeddings[:4], ["a", "b", "c", "d"], metadata=metadata)
    wanted = typed_filter(parse_filter_specs(["year=2020", "ok=true"]), index)  # what `search --filter` passes
    assert wanted == {"year": [2020], "ok": [True]}
    assert [h["id"] for h in index.search(setup["gallery"].embeddings[:1], k=4, filter=wanted)[0]] == ["a"]
    either = index.search(setup["gallery"].embeddings[:1], k=4, filter={"weight": [0.25, 2.0], "maker": [None, 'z"]']})
    assert {h["id"] for h in either[0]} == {"b", "d"}
    assert index.records(["c"]) == [{"id": "c", "label": None, "path": None, "year": None, "ok": True,
                                     "weight": None, "maker": "y"}]  # fmt: skip


def test_the_pipeline_of_a_loaded_model_searches_milvus_as_the_folder(setup: dict) -> None:
    from crossmetric.retrieval.pipeline import retrieval_pipeline

    query = str(setup["queries"][1])
    with one_thread():
        by_milvus = retrieval_pipeline(setup["loaded"], setup["flat"], top_k=5, rerank_top_k=8)(query)
        by_folder = retrieval_pipeline(setup["loaded"], setup["folder"], top_k=5, rerank_top_k=8)(query)
        plain = retrieval_pipeline(setup["loaded"], setup["flat"], top_k=5)(query)
    assert [h["id"] for h in by_milvus] == [h["id"] for h in by_folder]
    assert all(h["reranked"] for h in by_milvus) and "reranked" not in plain[0]
    assert [h["id"] for h in plain] == [h["id"] for h in setup["flat"].search(setup["query_embeddings"][1:2], 5)[0]]


def test_search_resolves_and_loads_the_model_and_its_reranker_once(setup: dict, monkeypatch, capsys) -> None:
    from crossmetric.cli import search as search_command
    from crossmetric.inference import loaded_model, loading, reranker_loading
    from crossmetric.modeling.modeling_crossmetric import CrossMetricModel
    from crossmetric.modeling.reranking_crossmetric import CrossMetricReranker

    calls: dict[str, int] = {}

    def counted(owner: object, name: str) -> None:
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for module in (search_command, loading, loaded_model, reranker_loading):  # every name it is imported under
        counted(module, "resolve_model")
    counted(reranker_loading, "resolved_reranker")
    counted(loaded_model, "resolved_reranker")
    monkeypatch.setattr(
        CrossMetricModel, "from_pretrained", _counting(CrossMetricModel.from_pretrained, calls, "model")
    )
    monkeypatch.setattr(CrossMetricReranker, "from_pretrained",
                        _counting(CrossMetricReranker.from_pretrained, calls, "reranker"))  # fmt: skip
    folder = setup["root"] / "folder_index"
    if not folder.exists():
        EmbeddingIndex.from_gallery(setup["gallery"], "exact").save(folder)
    query = str(setup["queries"][0])
    assert cli("search", "--model", str(setup["model"]), "--index", str(folder), query, "--rerank_top_k", "8") == 0
    assert calls == {"resolve_model": 1, "resolved_reranker": 1, "model": 1, "reranker": 1}, calls
    assert "re-ranked" in capsys.readouterr().out


def _counting(bound, calls: dict, name: str):
    def load(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        return bound(*args, **kwargs)

    return load


def test_reranking_gives_the_same_order_as_against_the_folder_index(setup: dict) -> None:
    loaded, queries = setup["loaded"], [str(q) for q in setup["queries"]]
    with one_thread():
        by_folder = search_images(loaded, setup["folder"], queries, 10, rerank_top_k=8)
        by_milvus = search_images(loaded, setup["flat"], queries, 10, rerank_top_k=8)
        plain = search_images(loaded, setup["flat"], queries, 10)
    assert ids_of(by_milvus) == ids_of(by_folder)
    assert ids_of(by_milvus) != ids_of(plain)  # the re-ranker changed some order: the comparison has teeth
    for got, expected in zip(by_milvus, by_folder):
        np.testing.assert_allclose([h["score"] for h in got], [h["score"] for h in expected], atol=1e-4)
        assert [h["reranked"] for h in got] == [True] * 8 + [False] * 2


def test_a_query_or_an_add_from_another_model_is_refused_naming_both(setup: dict) -> None:
    other_dir = export_with_reranker(setup["root"] / "other", seed=1)
    with one_thread():
        other = LoadedModel.load(other_dir)
    flat = setup["flat"]
    with pytest.raises(
        ValueError, match=r"built with '.*model' \(fingerprint .*\), but the query comes from '.*other'"
    ):
        search_images(other, flat, [str(setup["queries"][0])], 5)
    with pytest.raises(ValueError, match=r"built with '.*model' .* but the items to add come from '.*other'"):
        flat.add(setup["gallery"].embeddings[:1], ["x"], model=other.reference)
    with pytest.raises(ValueError, match=r"built with '.*model' .* the gallery to add comes from '.*other'"):
        MilvusIndex.create(flat.uri, "flat", dim=16, model=other.reference, exist_ok=True)
    with pytest.raises(ValueError, match="does not exist at .*build it with `crossmetric index build --milvus"):
        MilvusIndex(flat.uri, "nothing_here")


class LiteServer:
    """``milvus-lite server`` on 127.0.0.1 and a free port (never 0.0.0.0, its default), stopped by :meth:`stop`."""

    def __init__(self, data: Path) -> None:
        from pymilvus import MilvusClient

        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        command = [shutil.which("milvus-lite") or "milvus-lite", "server", "--data-dir", str(data),
                   "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            try:
                probe = MilvusClient(uri=self.uri, timeout=5, grpc_options=GRPC_OPTIONS, dedicated=True)
                probe.list_collections()
                probe.close()
                return
            except Exception:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError("milvus-lite server did not start") from None
                time.sleep(0.3)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def lite_server(tmp_path_factory: pytest.TempPathFactory):
    server = LiteServer(tmp_path_factory.mktemp("milvus_server"))
    yield server
    server.stop()


def cli(*args: str) -> int:
    """``crossmetric ARGS`` in this process (one thread), its exit code."""
    from crossmetric.cli.main import main

    with one_thread():
        return main(list(args))


def test_index_build_info_search_and_serve_with_milvus_flags(setup: dict, lite_server: LiteServer, capsys) -> None:
    target = ["--milvus", lite_server.uri, "--collection", "shapes"]
    model, query = str(setup["model"]), setup["queries"][0]
    assert cli("index", "build", "--model", model, "--images", str(setup["images"]), *target, "--milvus_index",
               "FLAT", "--no-progress") == 0  # fmt: skip
    capsys.readouterr()
    assert cli("index", "info", *target, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["count"], info["index_type"], info["head_tokens"]) == (CLASSES * PER_CLASS, "FLAT", setup["tokens"])
    assert cli("search", "--model", model, *target, str(query), "--top_k", "5", "--json") == 0
    expected = setup["folder"].search(setup["query_embeddings"][:1], k=5)[0]
    assert [h["id"] for h in json.loads(capsys.readouterr().out)["results"]] == [h["id"] for h in expected]
    assert cli("search", "--model", model, "--milvus", lite_server.uri, str(query)) == 2
    assert "--milvus needs --collection" in capsys.readouterr().err
    assert cli("index", "info", "--milvus", lite_server.uri, "--collection", "nothing_here") == 2
    assert "does not exist" in capsys.readouterr().err
    server = Server(["--model", model, *target, "--rerank_top_k", "8"])
    try:
        body, headers = multipart([("q.png", query.read_bytes())])
        answer = http_call(server.port, "POST", "/search?k=5", body, headers)
        assert answer.status == 200, answer.body
        hits = answer.json()
        hits = hits["results"][0] if isinstance(hits, dict) else hits[0]
        reranked = search_images(setup["loaded"], setup["folder"], [str(query)], 5, rerank_top_k=8)[0]
        assert [h["id"] for h in hits] == [h["id"] for h in reranked]
    finally:
        server.stop()


def accelerate_build(args: list[str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               "-m", "crossmetric.cli", "index", "build", *args]  # fmt: skip
    environment = {**cli_env(), "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "1"}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=400)


def all_items(uri: str, collection: str, ids: list[str]) -> tuple[int, list, np.ndarray, list]:
    """Everything a collection holds about ``ids`` (count, records, embeddings, top-10 of the test's queries), read
    with a client closed afterwards (an idle client is not left to the server's keepalive policy)."""
    index = MilvusIndex(uri, collection)
    try:
        embeddings, _ = index.rerank_features(ids)
        records = [(r["id"], r["label"], r["path"]) if r else None for r in index.records(ids)]
        return len(index), records, embeddings, ids_of(index.search(embeddings[:12], k=10))
    finally:
        index.close()


# ``crossmetric index build`` in chunks of 64 images, killed (os._exit: no cleanup, no flush) after its first upsert
KILLED_AFTER_ONE_CHUNK = """
import os, sys
from crossmetric.retrieval import milvus_build
from crossmetric.retrieval.milvus_index import MilvusIndex
milvus_build.build_milvus_index.__kwdefaults__["chunk_size"] = 64
upsert = MilvusIndex.add
def upsert_then_die(self, *args, **kwargs):
    upsert(self, *args, **kwargs)
    os._exit(9)
MilvusIndex.add = upsert_then_die
from crossmetric.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_process_build_equals_one_process_and_a_killed_build_reruns_to_every_image_once(
    setup: dict, lite_server: LiteServer
) -> None:
    uri, ids = lite_server.uri, setup["gallery"].ids
    common = ["--model", str(setup["model"]), "--images", str(setup["images"]), "--milvus", uri, "--milvus_index",
              "FLAT", "--no-progress"]  # fmt: skip
    two = accelerate_build([*common, "--collection", "two"])
    assert two.returncode == 0, two.stderr[-3000:]
    assert cli("index", "build", *common, "--collection", "one") == 0
    count, records, vectors, top = all_items(uri, "one", ids)
    assert count == len(ids) and None not in records
    count_two, records_two, vectors_two, top_two = all_items(uri, "two", ids)
    assert (count_two, records_two, top_two) == (count, records, top)
    np.testing.assert_allclose(vectors_two, vectors, atol=1e-6)
    # a build killed after its first upserted chunk (os._exit: no cleanup), then the same command again
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_ONE_CHUNK, "index", "build", *common, "--collection",
                             "killed"], env=cli_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == 9, killed.stderr[-3000:]
    assert all_items(uri, "killed", ids[:64])[0] == 64  # the first chunk only
    assert cli("index", "build", *common, "--collection", "killed") == 0
    count_rerun, records_rerun, vectors_rerun, _ = all_items(uri, "killed", ids)
    assert (count_rerun, records_rerun) == (len(ids), records)  # every image, once
    np.testing.assert_allclose(vectors_rerun, vectors, atol=1e-6)
