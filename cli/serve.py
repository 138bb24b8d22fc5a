"""``crossmetric serve``: an embedding and search server with a search page (``pip install "crossmetric[serve]"``).

    crossmetric serve --model DIR_OR_HUB_ID [--index DIR] [--host 127.0.0.1] [--port 8080] [--backend torch|onnx]
        [--max_batch_size 32] [--max_wait_ms 5 (torch) / 0 (onnx)] [--max_concurrent_requests 64]
        [--max_client_batch_size 32]
        [--api_key KEY] [--rerank_top_k K] [--milvus URI --collection NAME (instead of --index)]

The model, index and flags are checked before the server starts (exit code 2 with one line on stderr); the model is
then loaded in the background while ``/health`` answers 503. The API key can come from ``CROSSMETRIC_API_KEY``
instead of the command line (where other users of the machine can read it in the process list).

``--rerank_top_k K`` re-ranks each ``/search``'s K nearest with the model's re-ranker (``MODEL/reranker/``), as
``crossmetric search --rerank_top_k`` does; it needs the torch backend and an index built with the head's tokens, and
is refused at start otherwise.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .arguments import (
    add_backend_argument,
    add_device_argument,
    add_progress_argument,
    apply_progress,
    explicit_progress,
    report_error,
)
from .logging_setup import add_log_level_argument
from .milvus_arguments import add_milvus_arguments, check_target, milvus_location

if TYPE_CHECKING:
    from ..serve.settings import ServeSettings

API_KEY_VARIABLE = "CROSSMETRIC_API_KEY"


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``crossmetric serve`` (defaults from :class:`~crossmetric.serve.settings.ServeSettings`)."""
    parser = argparse.ArgumentParser(
        prog="crossmetric serve",
        description="Serve a model over HTTP: /embed, /search, /info, /health, /metrics, the OpenAPI docs at /docs "
        "and a search page at /.",
    )
    parser.add_argument("--model", required=True, help="exported model folder, training run folder, or Hub id")
    parser.add_argument(
        "--index", default=None, help="index folder (reloaded when rebuilt) or Hub id; default: the model's index/"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8080)
    add_backend_argument(parser)
    add_device_argument(parser)
    parser.add_argument("--max_batch_size", type=int, default=32, help="images in one forward pass at most")
    parser.add_argument(
        "--max_wait_ms",
        type=float,
        default=None,
        help="wait at most this long for images still being decoded before a pass (default: 5 torch, 0 onnx)",
    )
    parser.add_argument(
        "--max_concurrent_requests", type=int, default=64, help="requests served at once; more get 429 at once"
    )
    parser.add_argument("--max_client_batch_size", type=int, default=32, help="images in one request at most (413)")
    parser.add_argument("--payload_limit", type=int, default=32 * 1024 * 1024, help="bytes of one request (413)")
    parser.add_argument(
        "--max_image_pixels", type=int, default=40_000_000, help="pixels of one image; more: 422 (decompression bomb)"
    )
    parser.add_argument(
        "--api_key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (except /health); or set {API_KEY_VARIABLE}",
    )
    parser.add_argument(
        "--rerank_top_k",
        type=int,
        default=None,
        help="re-rank this many nearest with the model's re-ranker (an export with reranker/, --backend torch)",
    )
    parser.add_argument(
        "--index_poll_interval", type=float, default=2.0, help="seconds between checks for a rebuilt index (0: never)"
    )
    parser.add_argument("--decode_workers", type=int, default=2, help="threads decoding images off the event loop")
    parser.add_argument(
        "--model_threads", type=int, default=None, help="the model's intra-op threads (default: half the CPUs)"
    )
    add_progress_argument(parser)  # the bars of a model or index downloaded from the Hub
    add_milvus_arguments(parser)  # --milvus URI --collection NAME instead of --index
    return add_log_level_argument(parser)


def settings_from_arguments(ns: argparse.Namespace) -> tuple[ServeSettings, str]:
    """``(ServeSettings, the resolved model source)``, checked: ValueError naming the flag at fault."""
    from ..serve.index_watch import find_index
    from ..serve.model_adapter import check_model, find_served_reranker, no_reranker_refusal, reranker_config_of
    from ..serve.search_service import check_index_folder_for_reranker
    from ..serve.settings import ServeSettings

    if not 0 <= ns.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {ns.port}.")
    api_key = ns.api_key if ns.api_key is not None else os.environ.get(API_KEY_VARIABLE) or None
    index = milvus_location(ns) if check_target(ns, "--index", required=False) else ns.index
    settings = ServeSettings(
        model=ns.model, index=index, backend=ns.backend, device=ns.device, max_batch_size=ns.max_batch_size,
        max_wait_ms=ns.max_wait_ms, max_concurrent_requests=ns.max_concurrent_requests,
        max_client_batch_size=ns.max_client_batch_size, payload_limit=ns.payload_limit,
        max_image_pixels=ns.max_image_pixels, api_key=api_key, rerank_top_k=ns.rerank_top_k,
        index_poll_interval=ns.index_poll_interval, decode_workers=ns.decode_workers, model_threads=ns.model_threads,
    )  # fmt: skip
    source = check_model(ns.model, ns.backend)
    reranker = find_served_reranker(source) if ns.rerank_top_k is not None else None
    if ns.rerank_top_k is not None and reranker is None:
        raise ValueError(no_reranker_refusal(ns.model))
    location, watched = find_index(index, source)  # a wrong --index fails here, before any weight is read
    if reranker is not None and not isinstance(index, (str, type(None))):  # --milvus: ask the collection now
        from types import SimpleNamespace

        from ..retrieval.reranking import check_index_for_reranker

        collection = index.open()
        try:
            check_index_for_reranker(collection, SimpleNamespace(config=reranker_config_of(reranker)))
        finally:
            collection.close()
    if reranker is not None and watched and location is not None:  # a Hub index is checked when it is loaded
        check_index_folder_for_reranker(Path(location), reranker_config_of(reranker))
    return settings, str(source)


def main(argv: Sequence[str]) -> int:
    """Parse ``argv``, check the configuration, and serve until stopped."""
    ns = build_parser().parse_args(explicit_progress(argv))
    apply_progress(ns.progress)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        return report_error("serve", f'{error.name} is missing; the server needs: pip install "crossmetric[serve]".')
    try:
        settings, _ = settings_from_arguments(ns)
    except (ValueError, FileNotFoundError, ImportError) as error:
        return report_error("serve", error)
    from ..serve.server import run_server

    return run_server(settings, ns.host, ns.port)
