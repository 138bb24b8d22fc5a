"""The server's dynamic batcher on its own: preprocessing overlaps the model, answers keep their order, a failing
stage fails only its own batch."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from crossmetric.serve.batching import DynamicBatcher


class Stages:
    """A prepare and a forward that record when they run, in which thread, and can be told to fail."""

    def __init__(self, forward_seconds: float = 0.05) -> None:
        self.forward_seconds = forward_seconds
        self.events: list[tuple[str, float, float, str]] = []
        self.fail_prepare_on: set[int] = set()
        self.lock = threading.Lock()

    def prepare(self, images: list[int]) -> np.ndarray:
        started = time.perf_counter()
        if any(image in self.fail_prepare_on for image in images):
            raise ValueError("bad image")
        time.sleep(0.02)
        with self.lock:
            self.events.append(("prepare", started, time.perf_counter(), threading.current_thread().name))
        return np.asarray(images, dtype=np.float32)[:, None] * 2

    def forward(self, prepared: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        time.sleep(self.forward_seconds)
        with self.lock:
            self.events.append(("forward", started, time.perf_counter(), threading.current_thread().name))
        return prepared + 1


async def _requests(batcher: DynamicBatcher, requests: list[list[int]]) -> list:
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.embed(images) for images in requests), return_exceptions=True)
    finally:
        await batcher.stop()


def test_preprocessing_overlaps_the_model_and_answers_keep_their_order() -> None:
    stages = Stages()
    batcher = DynamicBatcher(stages.forward, max_batch_size=2, max_wait_ms=0, prepare=stages.prepare)
    requests = [[i] for i in range(8)]
    answers = asyncio.run(_requests(batcher, requests))
    for images, answer in zip(requests, answers):
        np.testing.assert_array_equal(answer[:, 0], np.asarray(images) * 2 + 1)
    prepares = [e for e in stages.events if e[0] == "prepare"]
    forwards = [e for e in stages.events if e[0] == "forward"]
    assert {e[3] for e in prepares}.isdisjoint({e[3] for e in forwards})  # two threads, one per stage
    assert len({e[3] for e in forwards}) == 1  # the model never runs in two threads
    assert all(a[2] <= b[1] for a, b in zip(forwards, forwards[1:]))  # nor twice at once
    overlapping = [p for p in prepares if any(f[1] < p[1] < f[2] for f in forwards)]
    assert overlapping, "no batch was preprocessed while the model ran the one before"


def test_a_failing_preprocessing_fails_its_own_batch_only() -> None:
    stages = Stages(forward_seconds=0.01)
    stages.fail_prepare_on = {3}
    batcher = DynamicBatcher(stages.forward, max_batch_size=1, max_wait_ms=0, prepare=stages.prepare)
    answers = asyncio.run(_requests(batcher, [[1], [2], [3], [4]]))
    assert isinstance(answers[2], ValueError)
    for images, answer in zip([[1], [2], [4]], [answers[0], answers[1], answers[3]]):
        np.testing.assert_array_equal(answer[:, 0], np.asarray(images) * 2 + 1)


def test_without_prepare_the_model_gets_the_images() -> None:
    batcher = DynamicBatcher(lambda images: np.asarray(images, dtype=np.float32)[:, None], max_batch_size=4)
    answers = asyncio.run(_requests(batcher, [[5, 6], [7]]))
    assert [a[:, 0].tolist() for a in answers] == [[5.0, 6.0], [7.0]]


@pytest.mark.parametrize("max_batch_size", [1, 3])
def test_a_request_larger_than_a_batch_is_split_and_rejoined(max_batch_size: int) -> None:
    stages = Stages(forward_seconds=0.0)
    batcher = DynamicBatcher(stages.forward, max_batch_size=max_batch_size, max_wait_ms=0, prepare=stages.prepare)
    (answer,) = asyncio.run(_requests(batcher, [list(range(7))]))
    np.testing.assert_array_equal(answer[:, 0], np.arange(7) * 2 + 1)
