"""``crossmetric serve`` against a real uvicorn process: batching, search, errors, thumbnails, reload, a real browser.

One server (the tiny ``test_resnet`` embedder, a 12-image index watched every 0.3 s) serves the whole module; every
load loop is bounded in count and time (``_serve_fixtures.burst``).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from _retrieval_fixtures import embed_reference, export_tiny_model, make_class_folder, write_image
from _serve_fixtures import (
    Answer,
    Server,
    burst,
    call,
    corrupt_jpeg,
    json_body,
    multipart,
    png_bomb,
    truncated_png,
)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from crossmetric.retrieval.index import EmbeddingIndex  # noqa: E402

CHROMIUM = os.environ.get("CROSSMETRIC_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = export_tiny_model(root / "model")
    gallery = make_class_folder(root / "gallery", classes=3, per_class=4)
    EmbeddingIndex.from_folder(str(model), str(gallery), progress=False).save(root / "index")
    args = ["--model", str(model), "--index", str(root / "index"), "--index_poll_interval", "0.3",
            "--payload_limit", "3000000", "--max_client_batch_size", "8", "--max_wait_ms", "20"]  # fmt: skip
    server = Server(args)
    yield SimpleNamespace(root=root, model=model, gallery=gallery, index=root / "index", server=server)
    assert server.stop() in (0, -15)
    assert "Stopped: the requests in flight were answered." in server.process.output


def metric(text: str, name: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (0 when absent)."""
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def upload(port: int, route: str, files: list[tuple[str, bytes]], query: str = "") -> Answer:
    body, headers = multipart(files)
    return call(port, "POST", route + query, body, headers)


def test_64_concurrent_embeds_share_forward_passes_and_equal_pooler_output(served, tmp_path) -> None:
    port = served.server.port
    files = [write_image(tmp_path / f"{i}.png", seed=1000 + i, size=(40 + i % 9, 48)) for i in range(64)]
    before = call(port, "GET", "/metrics").body.decode()
    answers = burst(lambda i: upload(port, "/embed", [(files[i].name, files[i].read_bytes())]), 64, 64, 120)
    assert [a.status for a in answers] == [200] * 64
    print(f"64 concurrent /embed: answered {len(answers)}")
    after = call(port, "GET", "/metrics").body.decode()
    passes = metric(after, "crossmetric_batch_size_count") - metric(before, "crossmetric_batch_size_count")
    images = metric(after, "crossmetric_batch_size_sum") - metric(before, "crossmetric_batch_size_sum")
    singles = metric(after, 'crossmetric_batch_size_bucket{le="1.0"}') - metric(
        before, 'crossmetric_batch_size_bucket{le="1.0"}'
    )
    assert images == 64 and passes < 64 and singles < passes, (passes, singles)  # some passes held several requests
    print(f"64 concurrent /embed: {passes:.0f} forward passes, {singles:.0f} of them of one image")
    served_embeddings = np.array([a.json()[0] for a in answers], dtype=np.float32)
    np.testing.assert_allclose(served_embeddings, embed_reference(served.model, files), atol=1e-5, rtol=0)
    assert 'crossmetric_requests_total{route="/embed",status="200"}' in after


def test_json_and_multipart_give_the_same_embeddings_in_input_order(served) -> None:
    port = served.server.port
    images = [p.read_bytes() for p in sorted(served.gallery.rglob("*.png"))[:3]]
    by_json = call(port, "POST", "/embed", *json_body(images)).json()
    by_form = upload(port, "/embed", [(f"{i}.png", data) for i, data in enumerate(images)]).json()
    assert len(by_json) == 3 and len(by_json[0]) == 32
    np.testing.assert_allclose(by_json, by_form, atol=1e-6)
    data_uri = "data:image/png;base64," + json_body(images[:1])[0].decode().split('"')[3]
    single = call(port, "POST", "/embed", f'{{"inputs": "{data_uri}"}}'.encode(), {"Content-Type": "application/json"})
    np.testing.assert_allclose(single.json(), by_json[:1], atol=1e-6)


def test_search_returns_the_nearest_entries_with_k_from_query_or_body(served) -> None:
    port = served.server.port
    query = served.gallery / "class_1" / "2.png"
    hits = upload(port, "/search", [("q.png", query.read_bytes())], "?k=3").json()
    assert len(hits) == 1 and len(hits[0]) == 3
    assert set(hits[0][0]) == {"id", "label", "score", "path"}
    assert hits[0][0]["id"] == "class_1/2.png" and hits[0][0]["label"] == "class_1"
    assert hits[0][0]["score"] == pytest.approx(1.0, abs=1e-4)
    body, headers = json_body([query.read_bytes()] * 2, k=5)
    both = call(port, "POST", "/search?k=2", body, headers).json()
    assert [len(h) for h in both] == [5, 5]


def test_info_health_metrics_and_docs(served) -> None:
    port = served.server.port
    info = call(port, "GET", "/info").json()
    assert info["backend"] == "torch" and info["embedding_dim"] == 32 and info["ready"] is True
    assert info["index"]["kind"] == "exact" and info["index"]["size"] >= 12
    assert info["limits"]["max_client_batch_size"] == 8 and info["limits"]["api_key_required"] is False
    assert call(port, "GET", "/health").status == 200
    text = call(port, "GET", "/metrics").body.decode()
    for name in ("crossmetric_request_duration_seconds_bucket", "crossmetric_queue_duration_seconds_count",
                 "crossmetric_index_size"):  # fmt: skip
        assert name in text
    schema = call(port, "GET", "/openapi.json").json()
    assert {"/embed", "/search", "/info", "/health", "/metrics"} <= set(schema["paths"])
    assert call(port, "GET", "/docs").status == 200


@pytest.mark.parametrize(
    "name, make",
    [
        ("corrupt.jpg", lambda g: corrupt_jpeg()),
        ("truncated.png", lambda g: truncated_png(g / "class_0" / "0.png")),
        ("notes.txt", lambda g: b"these are words, not pixels\n" * 20),
        ("bomb.png", lambda g: png_bomb()),
    ],
)
def test_an_image_that_does_not_decode_gets_422_naming_it(served, name, make) -> None:
    good = (served.gallery / "class_0" / "1.png").read_bytes()
    answer = upload(served.server.port, "/embed", [("good.png", good), (name, make(served.gallery))])
    assert answer.status == 422, answer.body
    body = answer.json()
    assert body["error_type"] == "image" and f'images[1] ("{name}")' in body["error"], body
    if name == "bomb.png":
        assert "decompression bomb" in body["error"]
    by_json = call(served.server.port, "POST", "/search", *json_body([good, make(served.gallery)]))
    assert by_json.status == 422 and "inputs[1]" in by_json.json()["error"]


def test_too_many_images_or_too_large_a_body_gets_413(served) -> None:
    port = served.server.port
    good = (served.gallery / "class_0" / "1.png").read_bytes()
    answer = upload(port, "/embed", [("a.png", good)] * 9)
    assert answer.status == 413 and answer.json()["error_type"] == "validation"
    assert "8" in answer.json()["error"]
    big = upload(port, "/embed", [("big.png", b"\x00" * 3_100_000)])
    assert big.status == 413 and "--payload_limit" in big.json()["error"]
    body, headers = multipart([("big.png", b"\x00" * 3_100_000)])
    chunked = call(port, "POST", "/embed", iter([body[i : i + 65536] for i in range(0, len(body), 65536)]), headers)
    assert chunked.status == 413  # no Content-Length: stopped while it streams in


def test_a_multipart_body_of_the_wrong_shape_gets_an_error_naming_what_to_send(served) -> None:
    port = served.server.port
    good = (served.gallery / "class_0" / "1.png").read_bytes()
    boundary = "b0undary"
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}

    def form(*parts: str) -> bytes:
        return "".join(f"--{boundary}\r\n{part}\r\n" for part in parts).encode() + f"--{boundary}--\r\n".encode()

    text_field = form('Content-Disposition: form-data; name="images"\r\n\r\nnot a file')
    answer = call(port, "POST", "/embed", text_field, headers)
    assert answer.status == 422 and "images[0] is a text field" in answer.json()["error"]
    other_field = form('Content-Disposition: form-data; name="picture"; filename="a.png"\r\n\r\nxx')
    answer = call(port, "POST", "/embed", other_field, headers)
    assert answer.status == 400 and '"picture"' in answer.json()["error"]
    body, file_headers = multipart([("cat.png", good)])
    answer = call(port, "POST", "/embed", body[: -len(b"--\r\n") - 40], file_headers)  # cut before its end
    assert answer.status == 422 and "multipart" in answer.json()["error"]
    body, file_headers = multipart([("cat.png", good), ("broken.png", b"not a png")])
    answer = call(port, "POST", "/embed", body, file_headers)
    assert answer.status == 422 and 'images[1] ("broken.png")' in answer.json()["error"]


def test_nothing_a_client_sends_causes_a_5xx(served) -> None:
    port = served.server.port
    form, form_headers = multipart([("a.png", b"x")])
    json_type = {"Content-Type": "application/json"}
    cases = [
        ("POST", "/embed", b"", {}),
        ("POST", "/embed", b"{", json_type),
        ("POST", "/embed", b'{"inputs": [[1, 2]]}', json_type),
        ("POST", "/embed", b'{"inputs": null}', json_type),
        ("POST", "/embed", b'{"inputs": "%%%"}', json_type),
        ("POST", "/embed", b'{"inputs": "data:image/png;base64,"}', json_type),
        ("POST", "/embed", b'{"inputs": "https://example.com/a.png"}', json_type),
        ("POST", "/embed", '{"inputs": "\u00e9\u00e9"}'.encode(), json_type),
        ("POST", "/embed", b"\xff\xfe\x00", json_type),
        ("POST", "/embed", b"--x\r\nbroken", {"Content-Type": "multipart/form-data; boundary=x"}),
        ("POST", "/embed", b"--x\r\nbroken", {"Content-Type": "multipart/form-data"}),
        ("POST", "/embed", b"a=b", {"Content-Type": "application/x-www-form-urlencoded"}),
        ("POST", "/search?k=-3", form, form_headers),
        ("POST", "/search?k=99999999999999999999", form, form_headers),
        ("POST", "/search?k=abc", form, form_headers),
        ("POST", "/search", b'{"inputs": "AAAA", "k": true}', json_type),
        ("POST", "/search", b'{"inputs": "AAAA", "k": 2.5}', json_type),
        ("GET", "/thumbnail", b"", {}),
        ("GET", "/thumbnail?id=" + "a" * 5000, b"", {}),
        ("GET", "/embed", b"", {}),
        ("PUT", "/info", b"", {}),
        ("GET", "/nowhere/../../etc/passwd", b"", {}),
    ]
    for method, path, body, headers in cases:
        answer = call(port, method, path, body, headers)
        assert 400 <= answer.status < 500, (method, path, body[:40], answer.status, answer.body[:300])
        if answer.headers.get("content-type") == "application/json":
            assert set(answer.json()) == {"error", "error_type"}, answer.body


def test_thumbnails_come_only_from_the_files_the_index_recorded(served) -> None:
    port = served.server.port
    answer = call(port, "GET", "/thumbnail?id=class_2/3.png")
    assert answer.status == 200 and answer.headers["content-type"] == "image/jpeg"
    assert answer.body[:2] == b"\xff\xd8"
    for wrong in ("../index/metadata.json", "/etc/passwd", str(served.gallery / "class_2" / "3.png"), "class_2"):
        refused = call(port, "GET", "/thumbnail?id=" + wrong)
        assert refused.status == 404 and refused.json()["error_type"] == "not_found"


def test_an_index_rebuilt_under_load_is_served_without_a_failed_request(served, capsys) -> None:
    from crossmetric.cli.main import main

    port = served.server.port
    query = (served.gallery / "class_0" / "2.png").read_bytes()
    size_before = call(port, "GET", "/info").json()["index"]["size"]
    new_gallery = served.root / "gallery2"
    shutil.copytree(served.gallery, new_gallery)
    for i in range(3):
        write_image(new_gallery / "class_9" / f"{i}.png", seed=9000 + i)
    answers: list[Answer] = []
    sizes: list[int] = []
    stop = threading.Event()

    def load() -> None:  # bounded: at most 400 requests, 60 s
        deadline = time.monotonic() + 60
        while not stop.is_set() and len(answers) < 400 and time.monotonic() < deadline:
            answers.append(upload(port, "/search", [("q.png", query)], "?k=20"))
            if answers[-1].status == 200:
                sizes.append(len(answers[-1].json()[0]))

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        argv = ["index", "build", "--model", str(served.model), "--images", str(new_gallery), "--device", "cpu"]
        assert main([*argv, "--output_dir", str(served.index)]) == 0
        deadline = time.monotonic() + 30
        while call(port, "GET", "/info").json()["index"]["size"] != size_before + 3:
            assert time.monotonic() < deadline, "the server did not pick up the rebuilt index"
            time.sleep(0.1)
        time.sleep(0.5)  # a few more requests on the new index
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=90)
    print(f"rebuild under load: sent {len(answers)}, answered {sum(a.status == 200 for a in answers)}, "
          f"sizes {sorted(set(sizes))}")  # fmt: skip
    assert answers and all(a.status == 200 for a in answers), sorted({a.status for a in answers})
    assert set(sizes) == {size_before, size_before + 3}  # answered from the old index, then from the new one
    metrics = call(port, "GET", "/metrics").body.decode()
    assert metric(metrics, "crossmetric_index_size") == size_before + 3
    assert metric(metrics, "crossmetric_index_reloads_total") >= 1


def test_the_search_page_in_a_real_browser(served, tmp_path) -> None:
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set CROSSMETRIC_CHROMIUM)")
    query = served.gallery / "class_2" / "1.png"
    screenshot = Path(os.environ.get("CROSSMETRIC_SCREENSHOT_DIR", tmp_path)) / "serve_search_page.png"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            page.goto(f"http://127.0.0.1:{served.server.port}/")
            page.fill("#k", "5")
            page.set_input_files("#file", str(query))
            page.wait_for_function("document.querySelectorAll('#results .hit').length === 5", timeout=30_000)
            page.wait_for_function(
                "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
                timeout=30_000,
            )
            labels = page.locator("#results .label").all_inner_texts()
            status = page.inner_text("#status")
            page.screenshot(path=str(screenshot), full_page=True)
            # the API docs render from the server's own files: no request leaves 127.0.0.1 (no CDN)
            requested: list[str] = []
            docs = browser.new_page()
            docs.on("request", lambda request: requested.append(request.url))
            docs.goto(f"http://127.0.0.1:{served.server.port}/docs")
            docs.wait_for_selector(".swagger-ui .opblock-summary-path", timeout=30_000)
            title = docs.inner_text(".swagger-ui .info .title")
            routes = docs.locator(".swagger-ui .opblock-summary-path").all_inner_texts()
        finally:
            browser.close()
    assert labels[0] == "class_2" and "5 nearest images" in status
    assert "crossmetric serve" in title and {"/embed", "/search", "/info"} <= {r.strip() for r in routes}
    outside = [url for url in requested if not url.startswith(f"http://127.0.0.1:{served.server.port}/")]
    assert requested and not outside, outside
    assert screenshot.stat().st_size > 10_000
    print(f"screenshot: {screenshot}")
