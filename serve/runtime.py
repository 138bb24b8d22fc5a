"""What the server holds while it runs: the model, the batcher, the index, the permits, and whether it is ready.

Loading happens after the HTTP server is up, in the background, so that ``/health`` can answer 503 until the model
(and index) are loaded and a warm-up batch has gone through the whole path (decode, preprocess, forward at batch 1
and at ``max_batch_size``); then it answers 200. A load that fails is logged and stops the server (exit code 1).

Images are decoded in a pool of ``decode_workers`` threads, off the event loop; preprocessing and the model run on
whole batches, each in a thread of its own, overlapping (:mod:`.batching`).

With ``--rerank_top_k`` the model's re-ranker is loaded with the served embedder, each batch returns the re-ranker's
tokens next to the embeddings (one backbone pass), every index loaded is checked for the head tokens it needs, and the
warm-up also re-ranks one query; ``/search`` then re-ranks (:mod:`.search_service`).
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from typing import Any

import numpy as np
from PIL import Image

from ..retrieval.compatibility import check_index_for_model
from .batching import DynamicBatcher
from .errors import ServeError
from .index_watch import IndexWatch, LoadedIndex, find_index
from .inputs import RawImage
from .metrics import ServerMetrics
from .model_adapter import (
    Location,
    ServedModel,
    UndecodableImage,
    check_model,
    find_served_reranker,
    load_served_model,
    no_reranker_refusal,
)
from .permits import Permits
from .search_service import Filter, Reranking, Results, check_filter_for, require_index, search
from .settings import ServeSettings
from .thumbnails import Thumbnails

logger = logging.getLogger(__name__)


def warmup_image(size: int) -> bytes:
    """A PNG of ``size`` × ``size`` pixels, to send through the whole path before the server says it is ready."""
    image = Image.linear_gradient("L").resize((size, size)).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class Runtime:
    """The server's state; routes call :meth:`embed`, :meth:`search_images` and ``thumbnails``.

    Args:
        settings: the command's configuration.
        on_fatal: called when loading fails (the server passes a function that stops it).
    """

    def __init__(self, settings: ServeSettings, on_fatal: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.on_fatal = on_fatal
        self.metrics = ServerMetrics()
        self.permits = Permits(settings.max_concurrent_requests)
        self.model: ServedModel | None = None
        self.batcher: DynamicBatcher | None = None
        self.index_watch: IndexWatch | None = None
        self.thumbnails: Thumbnails | None = None
        self.reranking: Reranking | None = None
        self.ready = False
        self.failure: str | None = None
        self.started_at = time.time()
        self._pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="crossmetric-decode")
        self._loading: asyncio.Task | None = None
        self._version = f"crossmetric {version('crossmetric')}"

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def startup(self) -> None:
        """Start loading in the background (the HTTP server answers meanwhile: ``/health`` 503)."""
        self._loading = asyncio.get_running_loop().create_task(self._load(), name="crossmetric-load")

    async def shutdown(self) -> None:
        """Stop after the requests in flight are answered (the HTTP server has stopped taking new ones)."""
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
        if self.index_watch is not None:
            await self.index_watch.stop()
        if self.batcher is not None:
            await self.batcher.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        logger.info("Stopped: the requests in flight were answered.")

    def _check_index(self, index: Any) -> None:
        """Refuse (at load and at each reload) an index built by another model, naming both, and, when re-ranking,
        one without the re-ranker's head tokens."""
        check_index_for_model(index, self.model.reference if self.model is not None else {})
        if self.reranking is not None:
            self.reranking.check_index(index)

    async def _load(self) -> None:
        s = self.settings
        try:
            started = time.perf_counter()
            source = await asyncio.to_thread(check_model, s.model, s.backend)
            location, watch = find_index(s.index, source)
            reranker = await asyncio.to_thread(self._find_reranker, source)
            self.model = await asyncio.to_thread(
                load_served_model, source, s.backend, s.device, s.max_image_pixels, s.resolved_model_threads(),
                reranker,
            )  # fmt: skip
            if self.model.reranker is not None and s.rerank_top_k is not None:
                self.reranking = Reranking(self.model.reranker, s.rerank_top_k)
            self.batcher = DynamicBatcher(
                self.model.run_batch, s.max_batch_size, s.resolved_max_wait_ms(), prepare=self.model.prepare_batch
            )
            self.batcher.start()
            self.thumbnails = Thumbnails(self.model.decode)
            self.index_watch = IndexWatch(
                location, watch, self.model.embedding_dim, s.index_poll_interval, self._on_index, self._check_index
            )
            await asyncio.to_thread(self.index_watch.load)
            warm = [RawImage("warm-up", warmup_image(self.model.image_size))]
            for count in sorted({1, s.max_batch_size}):
                await self.embed(warm * count)
            if self.reranking is not None and self.index is not None:
                await self.search_images(warm, 1)  # the re-ranker's first pass, before /health says ready
            self.batcher.observe = self.metrics.observe_batch  # from here on: the clients' batches, not the warm-up
            self.index_watch.start()
            self.ready = True
            loaded = self.index_watch.current
            logger.info(
                "Ready in %.1f s: %s (%s backend, %d-dimensional embeddings), index: %s%s.",
                time.perf_counter() - started, s.model, s.backend, self.model.embedding_dim,
                f"{loaded.source} ({len(loaded.index)} entries)" if loaded else "none (/search answers 424)",
                f", re-ranking the {s.rerank_top_k} nearest" if self.reranking is not None else "",
            )  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a model or index that cannot be served: say why and stop
            self.failure = f"{type(error).__name__}: {error}"
            logger.error("crossmetric serve could not start: %s", self.failure)
            if self.on_fatal is not None:
                self.on_fatal(self.failure)

    def _find_reranker(self, source: Any) -> Location | None:
        """Where the model's re-ranker is when ``--rerank_top_k`` asks for one (the command refused a model without
        one already; this refuses it for a server started from Python)."""
        if self.settings.rerank_top_k is None:
            return None
        location = find_served_reranker(source)
        if location is None:
            raise ValueError(no_reranker_refusal(self.settings.model))
        return location

    def _on_index(self, loaded: LoadedIndex) -> None:
        self.metrics.index_size.set(len(loaded.index))
        if loaded.generation > 0:
            self.metrics.index_reloads.inc()

    # -- what routes use ---------------------------------------------------------------------------------------
    def require_ready(self) -> None:
        """503 (``unhealthy``) until the model is loaded and warmed up."""
        if not self.ready:
            why = f"it failed to load: {self.failure}" if self.failure else "the model is still loading"
            raise ServeError("unhealthy", f"the server is not ready: {why}.")

    async def run_off_loop(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` in the decode pool."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)

    def _decode_all(self, images: list[RawImage]) -> list[Image.Image]:
        """Decode a request's images (blocking); 422 naming the first that does not decode."""
        assert self.model is not None
        decoded = []
        for image in images:
            try:
                decoded.append(self.model.decode(image.data))
            except UndecodableImage as error:
                raise ServeError("image", f"{image.name} could not be decoded: {error.reason}.") from None
        return decoded

    async def embed_with_tokens(self, images: list[RawImage]) -> tuple[np.ndarray, np.ndarray | None]:
        """``(embeddings, re-ranker tokens or None)`` of a request's images, in order, through the shared batcher
        (the tokens come from the same pass when a re-ranker is loaded)."""
        assert self.batcher is not None
        count = len(images)
        self.batcher.expect(count)
        try:
            decoded = await self.run_off_loop(self._decode_all, images)
        except BaseException:
            self.batcher.forget(count)
            raise
        try:
            outputs = await self.batcher.embed(decoded, announced=count)
        except Exception as error:
            raise ServeError("backend", f"the model failed on this batch ({type(error).__name__}).") from None
        return outputs if isinstance(outputs, tuple) else (outputs, None)

    async def embed(self, images: list[RawImage]) -> np.ndarray:
        """The embeddings of a request's images, in order."""
        return (await self.embed_with_tokens(images))[0]

    async def search_images(self, images: list[RawImage], k: int, filter: Filter | None = None) -> Results:
        """The ``k`` nearest index entries of each of a request's images that pass ``filter`` (checked against the
        index before any image is embedded; re-ranked with ``--rerank_top_k``)."""
        wanted = check_filter_for(require_index(self.index), filter)
        embeddings, tokens = await self.embed_with_tokens(images)
        loaded = self.index  # the index of this moment: a reload swaps in a new one, already checked
        return await self.run_off_loop(search, loaded, embeddings, k, self.reranking, tokens, wanted)

    @property
    def index(self) -> LoadedIndex | None:
        return self.index_watch.current if self.index_watch is not None else None

    def info(self) -> dict[str, Any]:
        """What ``/info`` shows: the model, backend, embedding size, index kind and size, and the limits."""
        model = self.model
        loaded = self.index
        return {
            "model_id": self.settings.model,
            "backend": self.settings.backend,
            "onnx_file": model.onnx_file if model else None,
            "embedding_dim": model.embedding_dim if model else None,
            "image_size": model.image_size if model else None,
            "index": loaded.info() if loaded else None,
            "rerank_top_k": self.settings.rerank_top_k,
            "reranker_loaded": self.reranking is not None,
            "reranker": model.reranker_info() if model else None,
            "limits": self.settings.limits(),
            "ready": self.ready,
            "version": self._version,
        }
