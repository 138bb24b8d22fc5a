"""``crossmetric serve`` at its limits: the API key, 429 at once past ``--max_concurrent_requests``, SIGTERM in flight,
and the command's refusals before it starts. Real uvicorn processes; every load loop bounded in count and time."""

from __future__ import annotations

import socket
import threading
import time
from types import SimpleNamespace

import pytest
from _fault_helpers import run_cli
from _retrieval_fixtures import export_tiny_model, make_class_folder
from _serve_fixtures import Answer, Server, burst, call, multipart

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "sk-test-7f3a9c1e5b2d4f60"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_limits")
    return SimpleNamespace(
        model=export_tiny_model(root / "model"), gallery=make_class_folder(root / "gallery", classes=2, per_class=4)
    )


@pytest.fixture(scope="module")
def guarded(tiny):
    """A server with a key and two permits, logging everything (``--log_level debug``) to check the key never shows."""
    server = Server(["--model", str(tiny.model), "--api_key", KEY, "--max_concurrent_requests", "2",
                     "--log_level", "debug"])  # fmt: skip
    yield server
    server.stop()


def images(tiny, count: int) -> tuple[bytes, dict[str, str]]:
    files = sorted(tiny.gallery.rglob("*.png"))
    return multipart([(f"{i}.png", files[i % len(files)].read_bytes()) for i in range(count)])


def test_without_the_key_every_route_but_health_is_401(guarded, tiny) -> None:
    body, headers = images(tiny, 1)
    assert call(guarded.port, "GET", "/health").status == 200
    for method, path in (("GET", "/info"), ("GET", "/metrics"), ("GET", "/"), ("GET", "/docs"), ("POST", "/embed")):
        for sent in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            answer = call(guarded.port, method, path, body if method == "POST" else b"", {**headers, **sent})
            assert answer.status == 401, (path, sent, answer.status)
            assert answer.json()["error_type"] == "unauthorized" and KEY.encode() not in answer.body
    answer = call(guarded.port, "POST", "/embed", body, {**headers, "Authorization": f"Bearer {KEY}"})
    assert answer.status == 200 and len(answer.json()) == 1
    info = call(guarded.port, "GET", "/info", headers={"Authorization": f"Bearer {KEY}"})
    assert info.json()["limits"]["api_key_required"] is True and KEY.encode() not in info.body
    # /search without an index: 424, the TEI answer for a route the loaded model cannot serve
    refused = call(guarded.port, "POST", "/search", body, {**headers, "Authorization": f"Bearer {KEY}"})
    assert refused.status == 424 and "--index" in refused.json()["error"]


def test_a_burst_past_the_permits_gets_429_at_once_and_no_5xx(guarded, tiny) -> None:
    body, headers = images(tiny, 8)
    headers["Authorization"] = f"Bearer {KEY}"
    answers = burst(lambda i: call(guarded.port, "POST", "/embed", body, headers), count=48, concurrency=6)
    statuses = [a.status for a in answers]
    refused = [a for a in answers if a.status == 429]
    print(f"burst: sent {len(answers)}, answered {statuses.count(200)}, 429 {len(refused)}, "
          f"5xx {sum(s >= 500 for s in statuses)}")  # fmt: skip
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 2 and refused
    assert all(a.json()["error_type"] == "overloaded" for a in refused)
    fastest_ok = min(a.seconds for a in answers if a.status == 200)
    assert max(a.seconds for a in refused) < 5 * fastest_ok + 0.5  # refused at once, not after queueing


def test_the_key_never_appears_in_the_logs(guarded) -> None:
    assert call(guarded.port, "GET", "/info", headers={"Authorization": "Bearer " + KEY[::-1]}).status == 401
    output = guarded.read_output()
    assert "DEBUG" in output  # the server did log at debug level
    assert KEY not in output and KEY[::-1] not in output


def test_sigterm_answers_the_requests_in_flight(tiny) -> None:
    server = Server(["--model", str(tiny.model), "--max_wait_ms", "2"])
    body, headers = images(tiny, 8)
    answers: list[Answer] = []
    stop_at = time.monotonic() + 30

    def load() -> None:  # bounded: at most 100 requests per thread, 30 s
        for _ in range(100):
            if time.monotonic() > stop_at:
                return
            answers.append(call(server.port, "POST", "/embed", body, headers))
            if answers[-1].status == 0:
                return  # the server has gone

    # one request surely in flight at SIGTERM: its headers and half its body are sent before, the rest after
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    slow.sendall(f"POST /embed HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n\r\n".encode())
    slow.sendall(body[: len(body) // 2])
    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    while len(answers) < 6 and time.monotonic() < stop_at:
        time.sleep(0.02)
    signalled = time.monotonic()
    server.process.popen.terminate()
    time.sleep(0.5)
    slow.sendall(body[len(body) // 2 :])
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < 100:
        chunk = slow.recv(65536)
        if not chunk:
            break
        reply += chunk
    slow.close()
    for thread in threads:
        thread.join(timeout=60)
    code = server.process.finish(timeout=60)
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    assert code in (0, -15), server.process.output[-2000:]
    assert "Stopped: the requests in flight were answered." in server.process.output
    answered = [a for a in answers if a.status]
    assert all(a.status == 200 for a in answered), sorted({a.status for a in answered})
    assert any(a.started < signalled < a.started + a.seconds for a in answered)  # in flight at SIGTERM, answered
    # requests sent after SIGTERM found no listener (refused or closed before they were read), never a 5xx
    assert all(a.error in ("ConnectionRefusedError", "ConnectionResetError", "RemoteDisconnected", "BrokenPipeError")
               for a in answers if not a.status)  # fmt: skip


def test_the_command_refuses_a_bad_configuration_before_serving(tiny, tmp_path, capsys) -> None:
    model = str(tiny.model)
    code, err = run_cli(capsys, "serve", "--model", model, "--rerank_top_k", "20")
    assert code == 2
    assert f"--rerank_top_k needs a model exported with a re-ranker ({model}/reranker/); this model has none" in err
    code, err = run_cli(capsys, "serve", "--model", model, "--backend", "onnx")
    assert code == 2 and "export --onnx" in err
    code, err = run_cli(capsys, "serve", "--model", str(tmp_path / "nothing"))
    assert code == 2 and "--model" in err
    code, err = run_cli(capsys, "serve", "--model", model, "--index", str(tmp_path / "no_index"))
    assert code == 2 and "--index" in err
    code, err = run_cli(capsys, "serve", "--model", model, "--max_batch_size", "0")
    assert code == 2 and "--max_batch_size" in err
    code, err = run_cli(capsys, "serve", "--model", model, "--api_key", " ")
    assert code == 2 and "--api_key" in err
