"""A real ``crossmetric serve`` process on 127.0.0.1 and a free port, and a small HTTP client for load tests.

Every load helper is bounded in count and in time: it sends a fixed number of requests and gives up at a deadline.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import socket
import sys
import time
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _fault_helpers import Process, cli_env
from PIL import Image


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]
    seconds: float
    error: str = ""  # the exception when no answer came: ConnectionRefusedError (never sent), or a drop
    started: float = 0.0  # time.monotonic() when the request was sent

    def json(self) -> Any:
        return json.loads(self.body)


def call(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
         timeout: float = 60) -> Answer:  # fmt: skip
    """One request on a new connection; a refused or dropped connection gives status 0."""
    started, at = time.perf_counter(), time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return Answer(response.status, data, {k.lower(): v for k, v in response.getheaders()},
                      time.perf_counter() - started, started=at)  # fmt: skip
    except (OSError, http.client.HTTPException) as error:
        return Answer(0, b"", {}, time.perf_counter() - started, type(error).__name__, at)
    finally:
        connection.close()


def multipart(files: list[tuple[str, bytes]], field: str = "images") -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body with ``files`` (name, bytes) in the repeated field ``field``."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def json_body(images: list[bytes], **fields: Any) -> tuple[bytes, dict[str, str]]:
    payload = {"inputs": [base64.b64encode(i).decode() for i in images], **fields}
    return json.dumps(payload).encode(), {"Content-Type": "application/json"}


def burst(send: Callable[[int], Answer], count: int, concurrency: int, deadline_s: float = 120) -> list[Answer]:
    """``count`` calls of ``send(i)`` from ``concurrency`` threads at once, all started within ``deadline_s``."""
    stop_at = time.monotonic() + deadline_s

    def one(i: int) -> Answer:
        if time.monotonic() > stop_at:
            return Answer(-1, b"", {}, 0.0)  # not sent: out of time
        return send(i)

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, range(count)))


def png_bytes(path: Path) -> bytes:
    return Path(path).read_bytes()


def png_bomb(side: int = 20_000) -> bytes:
    """A valid 1-bit PNG of ``side`` × ``side`` pixels that compresses to a few kilobytes (a decompression bomb)."""
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def truncated_png(path: Path) -> bytes:
    data = Path(path).read_bytes()
    return data[: len(data) // 2]


def corrupt_jpeg() -> bytes:
    """A JPEG whose header is right and whose data is garbage."""
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(out, format="JPEG")
    data = bytearray(out.getvalue())
    for i in range(200, len(data) - 10):
        data[i] = (data[i] * 7 + 13) % 256
    return bytes(data)


class Server:
    """``crossmetric serve ARGS`` on a free port, its output collected; :meth:`stop` sends SIGTERM."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, ready_timeout: float = 180) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "crossmetric.cli", "serve", *args, "--port", str(self.port)]
        self.process = Process(argv, env=env or cli_env())
        deadline = time.monotonic() + ready_timeout
        while call(self.port, "GET", "/health", timeout=5).status != 200:
            if self.process.popen.poll() is not None or time.monotonic() > deadline:
                self.process._take(0.5)
                raise AssertionError(f"the server did not become healthy:\n{self.read_output()}")
            time.sleep(0.2)

    def read_output(self, wait: float = 0.2) -> str:
        while self.process._take(wait):
            if self.process._queue.empty():
                break
        return self.process.output

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait; the exit code (uvicorn re-raises the signal after its graceful shutdown: -15)."""
        if self.process.popen.poll() is None:
            self.process.popen.terminate()
        return self.process.finish(timeout)
