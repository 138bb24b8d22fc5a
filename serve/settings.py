"""What ``crossmetric serve`` was asked to serve, and its limits: one frozen record the app and ``/info`` read."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_PAYLOAD_LIMIT = 32 * 1024 * 1024  # bytes of one request body
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # a decoded image above this is refused as a possible decompression bomb
MAX_K = 1000  # nearest neighbours one query may ask for
# How long a batch waits for images still being decoded, by backend. Waiting pays only where a bigger batch costs less
# per image. Measured on the main job's 64 px model, 2 CPU cores, one model thread: PyTorch takes 16 ms for one image
# and 4.7 ms per image in a batch of 16, and at 16 clients batches of 16 gave 1.5-2x the throughput of the batches of 8
# that form without waiting; ONNX Runtime takes 1.1 ms per image at any batch size, and there waiting only made
# clients that send together move in lock-step (all decoding, then all in the model): about a third fewer images/s.
DEFAULT_MAX_WAIT_MS = {"torch": 5.0, "onnx": 0.0}
RERANK_NEEDS_TORCH = "--rerank_top_k needs --backend torch: the ONNX graph outputs the embedding only."


def default_model_threads() -> int:
    """Half the CPUs this process may use (at least one): the model's share; decoding and HTTP take the rest."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 2
    return max(1, cpus // 2)


@dataclass(frozen=True)
class ServeSettings:
    """The server's configuration (the command's flags).

    Attributes:
        model: an exported model folder, a training run folder (its ``model/``) or a Hub id.
        index: an index folder or Hub id; None: the model's own ``index/`` when it has one, else no ``/search``.
        backend: ``"torch"`` or ``"onnx"`` (the model's ``onnx/model.onnx``, fp32).
        device: torch device (``"cpu"``, ``"cuda"``; None: cuda when available).
        max_batch_size: images in one forward pass at most.
        max_wait_ms: how long a batch may wait for more images while admitted requests are still being decoded
            (None: :data:`DEFAULT_MAX_WAIT_MS` of the backend).
        max_concurrent_requests: requests being served at once; one more gets 429 at once.
        max_client_batch_size: images in one request at most (413 above).
        payload_limit: bytes of one request body at most (413 above).
        max_image_pixels: pixels of one decoded image at most (422 above: a possible decompression bomb).
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``.
        rerank_top_k: re-rank this many first-stage candidates, 2 or more (needs a model exported with a re-ranker,
            the torch backend and an index built with the head's tokens).
        index_poll_interval: seconds between checks of the index folder for a rebuilt index (0: never reload).
        decode_workers: threads that decode images, off the event loop.
        model_threads: the model's intra-op threads (None: :func:`default_model_threads`, half the CPUs: the other
            half decodes images and answers HTTP; measured on 2 cores, one model thread gave the ONNX backend about
            twice the throughput of two, whose spin-waiting took the CPU the decoding needed).
    """

    model: str
    index: str | None = None
    backend: str = "torch"
    device: str | None = None
    max_batch_size: int = 32
    max_wait_ms: float | None = None
    max_concurrent_requests: int = 64
    max_client_batch_size: int = 32
    payload_limit: int = DEFAULT_PAYLOAD_LIMIT
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    api_key: str | None = None
    rerank_top_k: int | None = None
    index_poll_interval: float = 2.0
    decode_workers: int = 2
    model_threads: int | None = None

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "max_concurrent_requests", "max_client_batch_size", "payload_limit")
        for name in (*positive, "max_image_pixels", "decode_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value!r}.")
        if self.model_threads is not None and self.model_threads < 1:
            raise ValueError(f"--model_threads must be a positive integer, got {self.model_threads}.")
        if self.max_wait_ms is not None and self.max_wait_ms < 0:
            raise ValueError(f"--max_wait_ms must be >= 0, got {self.max_wait_ms}.")
        if self.index_poll_interval < 0:
            raise ValueError(f"--index_poll_interval must be >= 0 (0: no reload), got {self.index_poll_interval}.")
        if self.rerank_top_k is not None and not 2 <= self.rerank_top_k <= MAX_K:
            raise ValueError(
                f"--rerank_top_k must be between 2 and {MAX_K} (the candidates re-scored per query), "
                f"got {self.rerank_top_k}."
            )
        if self.backend not in ("torch", "onnx"):
            raise ValueError(f"--backend must be torch or onnx, got {self.backend!r}.")
        if self.rerank_top_k is not None and self.backend != "torch":
            raise ValueError(RERANK_NEEDS_TORCH)
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api_key is empty: pass a key, or leave the flag out for a server without one.")

    def resolved_max_wait_ms(self) -> float:
        return self.max_wait_ms if self.max_wait_ms is not None else DEFAULT_MAX_WAIT_MS[self.backend]

    def resolved_model_threads(self) -> int:
        return self.model_threads or default_model_threads()

    def limits(self) -> dict[str, Any]:
        """The limits ``/info`` shows (never the API key: only whether one is required)."""
        shown = {k: v for k, v in asdict(self).items() if k not in ("model", "index", "api_key", "device")}
        shown["model_threads"] = self.resolved_model_threads()
        shown["max_wait_ms"] = self.resolved_max_wait_ms()
        return shown | {"max_k": MAX_K, "api_key_required": self.api_key is not None}

    def __repr__(self) -> str:  # the key must not reach a log line through a repr
        return f"ServeSettings(model={self.model!r}, index={self.index!r}, backend={self.backend!r}, ...)"
