"""Dynamic batching: the images of concurrent requests share one preprocessing call and one forward pass.

A request hands its decoded images to :meth:`DynamicBatcher.embed` and awaits their embeddings. One task collects
queued images into a batch of at most ``max_batch_size``, preprocesses it in one thread and hands it to the model's
thread (the model never runs on the event loop, and never in two threads at once); while a batch runs, the next one
fills up and is preprocessed, so under load batches grow by themselves and the model's thread runs only the model.
The image processor runs on the batch too: it costs about a third per image on 16 images of what it costs on one
(measured on the main job's 64 px model), as the forward pass does.

When the model is idle, a batch waits at most ``max_wait_ms`` for more images, and only while admitted requests
are still being decoded (:meth:`DynamicBatcher.expect` announces them): a lone client pays no waiting time, and
clients that arrive together share a pass. Text Embeddings Inference batches the same way (queue, one batching task,
a backend thread); it needs no wait because its tokenisation is fast, where decoding an image is not. Waiting pays
only where a bigger batch costs less per image, so the default wait depends on the backend
(:data:`~crossmetric.serve.settings.DEFAULT_MAX_WAIT_MS`: none for ONNX Runtime on the CPU, whose time per image falls
little with the batch size: 1.09 ms at batch 1, 0.80 ms at batch 16 on the main job's model, one thread).

A pass may return more than the embeddings: with a re-ranker loaded, ``forward`` returns a tuple of row-aligned arrays
(the embeddings and the re-ranker's tokens, from the same backbone pass), and each request gets its rows of each.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
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

    With ``prepare``, a batch runs in two stages, each in its own thread: ``prepare`` (the image processor) and then
    ``forward`` (the model) on what it returned. The stages overlap: the next batch is preprocessed while the model
    runs this one, so the model's thread does nothing but the model (measured on the main job's 64 px model with ONNX
    Runtime on 2 CPU cores: preprocessing took a third of the model thread's time when both ran there). The next batch
    is taken just in time: when the model, by the running averages of both stages' times per image and of the event
    loop's lateness, is one preprocessing away from free (or when a full batch is queued). Taken any earlier it would
    hold only the images that arrived while the model started, and batches would stop growing under load. A prepared
    batch goes from the preparing thread to the model's thread through a thread-safe queue, and only the answers go
    back through the event loop.

    Args:
        forward: embeds one batch (of images, or of what ``prepare`` returned); called in the batcher's model thread,
            one batch at a time.
        max_batch_size: images in one pass at most (a larger request is split over several passes).
        max_wait_ms: how long a pass may wait for announced images before it runs.
        observe: called after each pass with ``(batch size, queue seconds of each chunk, seconds of preprocessing
            and model)``.
        prepare: preprocesses one batch of images (None: ``forward`` takes the images).
    """

    def __init__(
        self,
        forward: Callable[[Any], Rows],
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        observe: Callable[[int, list[float], float], None] | None = None,
        prepare: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        self.forward = forward
        self.prepare = prepare
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.observe = observe
        self._queue: deque[_Chunk] = deque()
        self._queued_rows = 0
        self._expected = 0  # images of admitted requests not yet queued (being decoded)
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        # prepared batches for the model's thread (at most one waits): a thread-safe queue, so that a prepared batch
        # reaches the model without a trip through the event loop, which is busy with HTTP under load (measured on the
        # main job's model with ONNX Runtime, 16 clients: that trip kept the model idle 1.7 ms between batches)
        self._prepared: queue.SimpleQueue = queue.SimpleQueue()
        self._slot_free: asyncio.Event | None = None
        self._busy = 0  # batches being prepared or in the model (changed on the event loop only)
        self._model_started = 0.0  # when the model began its current batch
        self._model_rows = 0  # and how many images that batch holds
        # running averages of each stage's time per image (batches vary in size: after a batch of one, a time per
        # batch would wait as long as for a full one), and of how late the event loop wakes the collector
        self._seconds = {"prepare": 0.0, "forward": 0.0, "late": 0.0}
        # a daemon thread: one blocked on an empty queue must never keep the interpreter from exiting
        self._thread = threading.Thread(target=self._run_model, name="crossmetric-forward", daemon=True)
        self._prepare_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="crossmetric-prepare")

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the batching task on the running event loop, and the model's thread."""
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._slot_free.set()
        self._tasks = [self._loop.create_task(self._collect(), name="crossmetric-batcher")]
        self._thread.start()

    async def stop(self) -> None:
        """Stop batching once the queue is empty (a graceful shutdown answers what was admitted first)."""
        while self._queue or self._busy:
            await asyncio.sleep(0.01)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._thread.is_alive():
            self._prepared.put(None)  # ends the model's thread
            self._thread.join()
        self._prepare_thread.shutdown(wait=True)

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
        if not self._tasks or self._wakeup is None:
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

    # -- stage one, on the event loop: when to take a batch ----------------------------------------------------
    async def _collect(self) -> None:
        """Take a batch once the model's slot is free and hand it to the preparing thread."""
        assert self._wakeup is not None and self._slot_free is not None
        while True:
            await self._slot_free.wait()
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self._busy == 0:  # the model is idle: wait at most max_wait_ms while admitted requests still decode
                await self._wait_until(self._queue[0].queued_at + self.max_wait, only_while_decoding=True)
            else:  # the model runs a batch: take the next one so that it is prepared when the model frees
                s, rows = self._seconds, min(self._queued_rows, self.max_batch_size)
                model_free = self._model_started + s["forward"] * self._model_rows
                moment = model_free - s["prepare"] * rows - s["late"]
                if await self._wait_until(moment):  # learn the loop's lateness (at most half a pass) to start earlier
                    passed = time.perf_counter() - moment
                    self._average("late", min(passed, s["forward"] * self._model_rows / 2))
            batch = self._take()
            self._busy += 1
            self._slot_free.clear()  # set again by the model's thread when it takes this batch
            images = [image for chunk in batch for image in chunk.images]
            if self.prepare is None:
                self._prepared.put((batch, images, time.perf_counter(), 0.0))
            else:
                self._prepare_thread.submit(self._prepare, batch, images)

    async def _wait_until(self, moment: float, only_while_decoding: bool = False) -> bool:
        """Wait until ``moment`` (a ``perf_counter`` time), or until a full batch is queued; ``only_while_decoding``:
        also stop once no announced image is still being decoded. True when it slept until the moment came (then
        ``perf_counter() - moment`` is how late the event loop woke it)."""
        assert self._wakeup is not None
        while self._queued_rows < self.max_batch_size and (self._expected > 0 or not only_while_decoding):
            remaining = moment - time.perf_counter()
            if remaining <= 0:
                return False
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                return True
        return False

    def _average(self, stage: str, seconds: float) -> None:
        previous = self._seconds[stage]
        self._seconds[stage] = seconds if previous == 0 else 0.8 * previous + 0.2 * seconds

    # -- stages two and three, in their threads ----------------------------------------------------------------
    def _prepare(self, batch: list[_Chunk], images: list[Any]) -> None:
        """In the preparing thread: preprocess a batch and put it in the model's queue (or fail its requests)."""
        assert self.prepare is not None and self._loop is not None
        started = time.perf_counter()
        try:
            inputs = self.prepare(images)
        except Exception as error:  # every request of the batch gets the error
            self._loop.call_soon_threadsafe(self._finish, batch, error, 0, [], 0.0)
            self._loop.call_soon_threadsafe(self._slot_free.set)  # type: ignore[union-attr]
            return
        seconds = time.perf_counter() - started
        self._average("prepare", seconds / len(images))
        self._prepared.put((batch, inputs, started, seconds))

    def _run_model(self) -> None:
        """The model's thread: run each prepared batch, hand its outputs to the event loop; ``None`` ends it."""
        assert self._loop is not None and self._slot_free is not None
        while (item := self._prepared.get()) is not None:
            batch, inputs, started, prepare_seconds = item
            count = sum(len(chunk.images) for chunk in batch)
            self._model_started, self._model_rows = time.perf_counter(), count  # before the collector wakes
            self._loop.call_soon_threadsafe(self._slot_free.set)  # the next batch may be taken while this one runs
            try:
                outputs: Any = self.forward(inputs)
                self._average("forward", (time.perf_counter() - self._model_started) / count)
            except Exception as error:  # the model failed: every request of the batch gets a 424
                logger.exception("Forward pass of %d images failed", count)
                outputs = error
            # the pass's own time: preprocessing and model, not the wait between them
            elapsed = prepare_seconds + time.perf_counter() - self._model_started
            self._loop.call_soon_threadsafe(
                self._finish, batch, outputs, count, [started - c.queued_at for c in batch], elapsed
            )

    def _finish(self, batch: list[_Chunk], outputs: Any, count: int, queued: list[float], elapsed: float) -> None:
        """On the event loop: answer each request of a batch with its rows of ``outputs`` (or the error)."""
        self._busy -= 1
        if isinstance(outputs, BaseException):
            self._fail(batch, outputs)
            return
        if self.observe is not None:
            self.observe(count, queued, elapsed)
        start = 0
        for chunk in batch:
            rows = len(chunk.images)
            if not chunk.future.done():  # a cancelled request (client gone) just drops its rows
                chunk.future.set_result(_rows(outputs, start, start + rows))
            start += rows

    @staticmethod
    def _fail(batch: list[_Chunk], error: BaseException) -> None:
        for chunk in batch:
            if not chunk.future.done():
                chunk.future.set_exception(error)

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
