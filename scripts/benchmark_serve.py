"""Throughput and latency of ``crossmetric serve`` under concurrent clients, for the torch and ONNX backends.

    python scripts/benchmark_serve.py --model MODEL --images FOLDER --output serve_benchmark.json
        [--backends torch onnx] [--concurrency 1 4 16 64] [--duration 10] [--repeats 3]

For each backend a real server is started (``crossmetric serve``, default batching settings, permits raised above the
largest concurrency so no request is refused); for each concurrency C, C clients each send one image per
``POST /embed`` (multipart, keep-alive connection, images taken in turn from ``--images``; the clients are asyncio
tasks writing raw HTTP/1.1, so that they take little of the CPU they share with the server) for ``--duration`` seconds
after a warm-up; the levels are measured ``--repeats`` times, interleaved, and each figure is the median over the
repeats (a machine shared with other work slows some of them; every repeat is kept in the JSON, with the load
average before it). Written to JSON: images per second, latency p50 / p90 / p99, the mean forward-pass size (from the
server's ``/metrics``), and per backend the ratio of each throughput to one client sending one image at a time.
The clients run on the same machine as the server and take part of its CPU.
``scripts/serve_demo_model.py`` makes a model (the main job's architecture) and a gallery to run it on.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def upload_request(port: int, data: bytes, name: str) -> bytes:
    """A complete ``POST /embed`` HTTP/1.1 request (keep-alive) with one file in the multipart field ``images``."""
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n\r\n'.encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    return (
        f"POST /embed HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; boundary={boundary}"
        f"\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    except OSError:
        return 0, b""
    finally:
        connection.close()


def batch_totals(port: int) -> tuple[float, float]:
    """``(forward passes, images)`` so far, from the server's Prometheus metrics."""
    text = get(port, "/metrics")[1].decode()
    values = [re.search(rf"^crossmetric_batch_size_{n} ([0-9.e+]+)$", text, re.M) for n in ("count", "sum")]
    return tuple(float(v.group(1)) if v else 0.0 for v in values)  # type: ignore[return-value]


async def client(port: int, requests: list[bytes], offset: int, stop_at: float, out: list) -> None:
    """One client on one keep-alive connection: send a request, read its answer, again, until ``stop_at``; append
    ``(latency seconds, status)`` per request to ``out``. Raw asyncio streams: a client costs the shared CPU little."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            out.append((time.perf_counter() - started, status))
    except (OSError, asyncio.IncompleteReadError):
        out.append((time.perf_counter() - started, 0))
    finally:
        writer.close()


async def load(port: int, requests: list[bytes], clients: int, seconds: float) -> tuple[list, float]:
    """``clients`` concurrent clients for ``seconds``; their ``(latency, status)`` records and the elapsed time."""
    records: list = []
    started = time.perf_counter()
    await asyncio.gather(*(client(port, requests, 7 * c, started + seconds, records) for c in range(clients)))
    return records, time.perf_counter() - started


def measure(port: int, requests: list[bytes], clients: int, duration: float, warmup: float) -> dict:
    """One load level: ``clients`` clients for ``warmup`` seconds (not counted), then ``duration`` seconds."""
    asyncio.run(load(port, requests, clients, warmup))
    before = batch_totals(port)
    load_average = os.getloadavg()[0]
    answers, elapsed = asyncio.run(load(port, requests, clients, duration))
    after = batch_totals(port)
    ok = np.array([latency for latency, status in answers if status == 200])
    passes, images = after[0] - before[0], after[1] - before[1]
    return {
        "clients": clients,
        "requests": len(answers),
        "errors": sum(status != 200 for _, status in answers),
        "seconds": round(elapsed, 2),
        "images_per_second": round(len(ok) / elapsed, 1),
        "latency_ms": {
            q: round(float(np.percentile(ok, p)) * 1000, 1) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))
        }
        if len(ok)
        else None,
        "mean_batch_size": round(images / passes, 2) if passes else None,
        "load_average_1min_before": round(load_average, 2),
    }


def run_backend(backend: str, ns: argparse.Namespace, images: list[tuple[bytes, str]]) -> dict[str, Any]:
    """Start a server with ``backend``, measure every concurrency, stop it."""
    port = free_port()
    permits = str(max(ns.concurrency) * 2)
    argv = [sys.executable, "-m", "crossmetric.cli", "serve", "--model", str(ns.model), "--backend", backend,
            "--port", str(port), "--max_concurrent_requests", permits, "--log_level", "warning",
            *shlex.split(ns.server_args)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = tempfile.TemporaryFile(mode="w+")  # the server's stderr (a pipe nobody reads could fill and stall it)
    server = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    try:
        deadline = time.monotonic() + 300
        while get(port, "/health")[0] != 200:
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"the {backend} server did not start:\n{log.read()[-3000:]}")
            time.sleep(0.5)
        info = json.loads(get(port, "/info")[1])
        requests = [upload_request(port, data, name) for data, name in images]
        runs: dict[int, list[dict]] = {clients: [] for clients in ns.concurrency}
        for repeat in range(ns.repeats):
            for clients in ns.concurrency:
                level = measure(port, requests, clients, ns.duration, ns.warmup)
                runs[clients].append(level)
                print(f"{backend:5s} repeat {repeat}: {clients:3d} clients {level['images_per_second']:7.1f} images/s, "
                      f"latency {level['latency_ms']}, mean batch {level['mean_batch_size']}, "
                      f"load {level['load_average_1min_before']}", flush=True)  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=120)
        log.close()
    levels = [summarise(clients, runs[clients]) for clients in ns.concurrency]
    single = next((lv["images_per_second"] for lv in levels if lv["clients"] == 1), None)
    ratios = {str(lv["clients"]): round(lv["images_per_second"] / single, 2) for lv in levels} if single else {}
    return {"info": {k: info[k] for k in ("backend", "onnx_file", "embedding_dim", "image_size", "limits")},
            "levels": levels, "throughput_ratio_to_one_client": ratios}  # fmt: skip


def summarise(clients: int, repeats: list[dict]) -> dict[str, Any]:
    """The median of each figure over the repeats of one level, and the repeats themselves."""

    def median(values: list[float | None]) -> float | None:
        kept = [v for v in values if v is not None]
        return round(float(np.median(kept)), 2) if kept else None

    latency = {
        q: median([r["latency_ms"][q] if r["latency_ms"] else None for r in repeats]) for q in ("p50", "p90", "p99")
    }
    return {
        "clients": clients,
        "images_per_second": median([r["images_per_second"] for r in repeats]),
        "latency_ms": latency,
        "mean_batch_size": median([r["mean_batch_size"] for r in repeats]),
        "errors": sum(r["errors"] for r in repeats),
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="an exported model folder (with onnx/ for onnx)")
    parser.add_argument("--images", required=True, type=Path, help="a folder of query images")
    parser.add_argument("--output", type=Path, default=Path("serve_benchmark.json"))
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"], choices=("torch", "onnx"))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per load level")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements of every level (medians reported)")
    parser.add_argument("--server_args", default="", help='more flags of crossmetric serve, e.g. "--max_wait_ms 0"')
    parser.add_argument("--max_images", type=int, default=256, help="distinct query images")
    ns = parser.parse_args(argv)
    files = sorted(p for p in ns.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    images = [(p.read_bytes(), p.name) for p in files[: ns.max_images]]
    if not images:
        parser.error(f"--images {ns.images} holds no image files")
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": str(ns.model),
        "query_images": len(images),
        "duration_s": ns.duration,
        "repeats": ns.repeats,
        "backends": {},
    }
    for backend in ns.backends:
        results["backends"][backend] = run_backend(backend, ns, images)
    onnx = results["backends"].get("onnx", {}).get("throughput_ratio_to_one_client", {})
    results["batching_ratio_onnx_16_clients"] = onnx.get("16")
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    ns.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {ns.output}; ONNX, 16 clients against one: {results['batching_ratio_onnx_16_clients']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
