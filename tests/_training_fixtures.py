"""A tiny learnable image-folder dataset and the settings of a tiny training run, shared by training tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

TINY_MODEL: dict[str, Any] = {"backbone": "test_resnet", "embedding_dim": 16, "cia_dim": 16, "cia_heads": 2}
# The tiny run (TINY_RUN_ARGS) as TrainingConfig fields, so that one dict gives both the command line of a subprocess
# (_fault_helpers.cli_args) and the config of an in-process run: identical settings by construction.
TINY_RUN: dict[str, Any] = {
    **TINY_MODEL, "pretrained": "none", "image_size": 32, "batch_size": 8, "samples_per_class": 2,
    "eval_batch_size": 32, "warmup_steps": 0, "progress": False, "split_strategy": "sorted", "run_name": "run",
    "logging_steps": 1,
}  # fmt: skip


def tiny_config(**fields: Any):
    """The ``TrainingConfig`` of a tiny run (:data:`TINY_RUN`), ``fields`` overriding."""
    from crossmetric.training.config import TrainingConfig

    return TrainingConfig(**{**TINY_RUN, **fields})


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread, as the CLI subprocesses (OMP_NUM_THREADS=1): bit-identical results, and on a busy 2-core
    machine two threads spin-wait on each other (measured: a 12-image forward of the test model took 8 ms of CPU
    with one thread, 350 ms with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_thread_fixture() -> Iterator[None]:
    """:func:`one_thread` for ``pytest.fixture(...)(one_thread_fixture)`` in a test module."""
    with one_thread():
        yield


TINY_RUN_ARGS = [
    "--backbone",
    "test_resnet",
    "--pretrained",
    "none",
    "--image_size",
    "32",
    "--embedding_dim",
    "16",
    "--cia_dim",
    "16",
    "--cia_heads",
    "2",
    "--batch_size",
    "8",
    "--samples_per_class",
    "2",
    "--eval_batch_size",
    "32",
    "--warmup_steps",
    "0",
    "--progress",
    "False",
    "--split_strategy",
    "sorted",
]


def make_shapes_folder(root: Path, num_classes: int = 8, per_class: int = 6, seed: int = 0) -> Path:
    """``root/class_XX/N.png``: each class a colour and a shape, each image jittered in place, size and noise."""
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        colour = tuple(int(v) for v in rng.integers(40, 255, 3))
        folder = root / f"class_{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = Image.new("RGB", (40, 40), (255, 255, 255))
            draw = ImageDraw.Draw(image)
            x, y, r = (int(v) for v in rng.integers(8, 16, 3))
            box = (x, y, x + r + 8, y + r + 8)
            if c % 3 == 0:
                draw.ellipse(box, fill=colour)
            elif c % 3 == 1:
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=colour)
            pixels = np.asarray(image, dtype=np.int16) + rng.integers(-20, 20, (40, 40, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root
