"""Dynamic batching: the images of concurrent requests share one preprocessing call and one forward pass.

A request hands its decoded images to :meth:`DynamicBatcher.embed` and awaits their embeddings. One task collects
queued images into a batch of at most ``max_batch_size`` and runs it in one worker thread (the model never runs on
the event loop, and never in two threads at once); while a batch runs, the next one fills up, so under load batches
grow by themselves. The image processor runs on the batch too: it costs about a third per image on 16 images of
what it costs on one (measured on the main job's 64 px model), as the forward pass does.

When the model is idle, a batch waits at most ``max_wait_ms`` for more images, and only while admitted requests
are still being decoded (:meth:`DynamicBatcher.expect` announces them): a lone client pays no waiting time, and
clients that arrive together share a pass. Text Embeddings Inference batches the same way (queue, one batching task,
a backend thread); it needs no wait because its tokenisation is fast, where decoding an image is not. Waiting pays
only where a bigger batch costs less per image, so the default wait depends on the backend
(:data:`~crossmetric.serve.settings.DEFAULT_MAX_WAIT_MS`: none for ONNX Runtime on the CPU, whose time per image does
not fall with the batch size).

A pass may return more than the embeddings: with a re-ranker loaded, ``forward`` returns a tuple of row-aligned arrays
(the embeddings and the re-ranker's tokens, from the same backbone pass), and each request gets its rows of each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)
Rows = Any  # what a pass returns: an N × ... array, or a tuple of arrays with N rows each


def _rows(outputs: Rows, start: int, stop: int) -> Rows:
    """Rows ``start:stop`` of a pass's outputs (of each array of a tuple)."""
    if isinstance(outputs, tuple):
        return tuple(part[start:stop] for part in outputs)
    return outputs[start:stop]


def _concatenate(parts: list[Rows]) -> Rows:
    """The outputs of one request's chunks, joined (array by array for tuples)."""
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], tuple):
        return tuple(np.concatenate(column) for column in zip(*parts))
    return np.concatenate(parts)


@dataclass
class _Chunk:
    """Images of one request waiting for the model, and the future that gets their embeddings."""

    images: list[Any]
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    """Batch the images of concurrent requests into calls of ``forward`` (N images -> an N × D array, or a tuple of
    arrays of N rows each).

    Args:
        forward: preprocesses and embeds one batch; called in the batcher's own thread, one batch at a time.
        max_batch_size: images in one pass at most (a larger request is split over several passes).
        max_wait_ms: how long a pass may wait for announced images before it runs.
        observe: called after each pass with ``(batch size, queue seconds of each chunk, forward seconds)``.
    """

    def __init__(
        self,
        forward: Callable[[list[Any]], Rows],
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        observe: Callable[[int, list[float], float], None] | None = None,
    ) -> None:
        self.forward = forward
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.observe = observe
        self._queue: deque[_Chunk] = deque()
        self._queued_rows = 0
        self._expected = 0  # images of admitted requests not yet queued (being decoded)
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._busy = False  # a batch is in the model
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossmetric-forward")

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the batching task on the running event loop."""
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="crossmetric-batcher")

    async def stop(self) -> None:
        """Stop batching once the queue is empty (a graceful shutdown answers what was admitted first)."""
        while self._queue or self._busy:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._thread.shutdown(wait=True)

    async def run_in_model_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function`` in the model's thread (warm-up), between batches."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    # -- requests ----------------------------------------------------------------------------------------------
    def expect(self, count: int) -> None:
        """Announce ``count`` images that an admitted request is decoding (:meth:`embed` or :meth:`forget` follows)."""
        self._expected += count

    def forget(self, count: int) -> None:
        """Withdraw an announcement whose images will not come (a decoding error, a dropped request)."""
        self._expected = max(0, self._expected - count)
        if self._wakeup is not None:
            self._wakeup.set()

    async def embed(self, images: list[Any], announced: int = 0) -> Rows:
        """The embeddings of ``images`` (what ``forward`` returns for them), in order; ``announced``: how many of them
        :meth:`expect` announced (they are no longer expected once queued)."""
        if self._task is None or self._wakeup is None:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        chunks = [
            _Chunk(images[start : start + self.max_batch_size], loop.create_future())
            for start in range(0, len(images), self.max_batch_size)
        ]
        self._queue.extend(chunks)
        self._queued_rows += len(images)
        self._expected = max(0, self._expected - announced)
        self._wakeup.set()
        parts = await asyncio.gather(*(chunk.future for chunk in chunks))
        return _concatenate(list(parts))

    # -- the batching task -------------------------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._queue[0].queued_at + self.max_wait
            while self._queued_rows < self.max_batch_size and self._expected > 0:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            self._busy = True
            started = time.perf_counter()
            images = [image for chunk in batch for image in chunk.images]
            try:
                outputs = await loop.run_in_executor(self._thread, self.forward, images)
            except Exception as error:  # the model failed: every request of the batch gets a 424
                logger.exception("Forward pass of %d images failed", len(images))
                for chunk in batch:
                    if not chunk.future.done():
                        chunk.future.set_exception(error)
                continue
            finally:
                self._busy = False
            elapsed = time.perf_counter() - started
            if self.observe is not None:
                self.observe(len(images), [started - c.queued_at for c in batch], elapsed)
            start = 0
            for chunk in batch:
                rows = len(chunk.images)
                if not chunk.future.done():  # a cancelled request (client gone) just drops its rows
                    chunk.future.set_result(_rows(outputs, start, start + rows))
                start += rows

    def _take(self) -> list[_Chunk]:
        """Pop the queued chunks that fit in one batch (the first always fits: chunks are at most a batch)."""
        batch = [self._queue.popleft()]
        rows = len(batch[0].images)
        while self._queue and rows + len(self._queue[0].images) <= self.max_batch_size:
            chunk = self._queue.popleft()
            batch.append(chunk)
            rows += len(chunk.images)
        self._queued_rows -= rows
        return batch
