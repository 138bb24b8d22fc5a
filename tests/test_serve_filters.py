"""``/search`` with a ``filter``, and a running ``crossmetric serve`` answering from an index changed by ``crossmetric
index add`` / ``remove`` (its watch of ``metadata.json``), against a real uvicorn process."""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace

import pytest
from _retrieval_fixtures import export_tiny_model, make_class_folder, write_image
from _serve_fixtures import Server, call, json_body

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from crossmetric.retrieval.build import build_index_sharded  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_filters")
    model = export_tiny_model(root / "model")
    gallery = make_class_folder(root / "gallery", classes=3, per_class=4)
    build_index_sharded(str(model), str(gallery), root / "index", batch_size=12, device="cpu", progress=False)
    server = Server(["--model", str(model), "--index", str(root / "index"), "--index_poll_interval", "0.2"])
    yield SimpleNamespace(root=root, model=model, gallery=gallery, index=root / "index", server=server)
    assert server.stop() in (0, -15)


def _form(query: bytes, filters: list[str]) -> tuple[bytes, dict[str, str]]:
    """A multipart body: the query image in ``images`` and each filter as a text field ``filter``."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="q.png"\r\n'.encode()
        + b"Content-Type: image/png\r\n\r\n"
        + query
        + b"\r\n"
    ]
    for text in filters:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="filter"\r\n\r\n{text}\r\n'.encode())
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _labels(answer) -> list[str]:
    assert answer.status == 200, answer.body[:500]
    return [hit["label"] for hit in answer.json()[0]]


def test_a_filter_in_json_form_fields_and_query_keeps_only_what_it_allows(served) -> None:
    port = served.server.port
    query = (served.gallery / "class_0" / "0.png").read_bytes()
    labels = _labels(call(port, "POST", "/search", *json_body([query], k=6, filter={"label": ["class_1"]})))
    assert labels == ["class_1"] * 4  # k=6, but only 4 items pass: all of them, and nothing else
    labels = _labels(call(port, "POST", "/search", *json_body([query], k=3, filter=["label=class_2"])))
    assert labels == ["class_2"] * 3
    labels = _labels(call(port, "POST", "/search", *_form(query, ["label=class_1,class_2"])))
    assert len(labels) == 8 and set(labels) == {"class_1", "class_2"}
    labels = _labels(call(port, "POST", "/search?k=12&filter=label%3Dclass_0%2Cclass_2", *json_body([query])))
    assert len(labels) == 8 and set(labels) == {"class_0", "class_2"}
    # two form fields: AND across them (class_1 or class_2, and class_2)
    assert set(_labels(call(port, "POST", "/search", *_form(query, ["label=class_1,class_2", "label=class_2"])))) == {
        "class_2"
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"filter": {"colour": ["red"]}}, "'colour': the index has no such column"),
        ({"filter": "label"}, "write COLUMN=VALUE"),
        ({"filter": {"label": []}}, "give a value or a non-empty list"),
        ({"filter": 5}, "filter must be"),
    ],
)
def test_a_bad_filter_is_a_422_with_the_error_body(served, fields: dict, message: str) -> None:
    query = (served.gallery / "class_0" / "0.png").read_bytes()
    answer = call(served.server.port, "POST", "/search", *json_body([query], **fields))
    assert answer.status == 422, answer.body[:500]
    body = answer.json()
    assert body["error_type"] == "invalid_input" and message in body["error"], body


def test_a_running_server_answers_from_an_index_changed_by_add_and_remove(served, capsys) -> None:
    from crossmetric.cli.main import main

    port = served.server.port
    size = call(port, "GET", "/info").json()["index"]["size"]
    new = served.root / "new"
    for i in range(2):
        write_image(new / "class_9" / f"{i}.png", seed=9100 + i)
    query = (new / "class_9" / "1.png").read_bytes()

    assert main(["index", "add", "--index", str(served.index), "--images", str(new), "--no-progress"]) == 0
    _wait_for_size(port, size + 2)
    hits = call(port, "POST", "/search", *json_body([query], k=1)).json()[0]
    assert hits[0]["id"] == "class_9/1.png" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)

    assert main(["index", "remove", "--index", str(served.index), "--ids", "class_9/1.png"]) == 0
    _wait_for_size(port, size + 1)
    hits = call(port, "POST", "/search", *json_body([query], k=20)).json()[0]
    assert len(hits) == size + 1 and "class_9/1.png" not in [h["id"] for h in hits]
    hits = call(port, "POST", "/search", *json_body([query], k=5, filter={"label": ["class_9"]})).json()[0]
    assert [h["id"] for h in hits] == ["class_9/0.png"]
    capsys.readouterr()


def _wait_for_size(port: int, size: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while call(port, "GET", "/info").json()["index"]["size"] != size:
        assert time.monotonic() < deadline, f"the server did not reload the changed index (size {size})"
        time.sleep(0.1)
