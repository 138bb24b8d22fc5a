"""The work folder of a resumable ``crossmetric index build``: the gallery cut into shards, each written once.

A build embeds shard after shard into ``.<output name>.build/<fingerprint>/`` next to the output folder:

- ``plan.json``: what the shards cover (item count, shard size) and the fingerprint they belong to;
- per shard ``i``: ``shard-<i>.embeddings.npy`` (float32, rows of the decoded images), ``shard-<i>.items.arrow``
  (Arrow IPC: the gallery ``row``, ``id``, ``label``, ``path`` and metadata columns of the same rows),
  ``shard-<i>.tokens.npy`` (float16 head tokens, when the model has a re-ranker), then, written last,
  ``shard-<i>.done.json``: the completion marker (counts, dimension, skipped files).

Every file is written atomically (a temporary sibling, fsynced, renamed), and a shard counts only once its marker
exists, so a kill at any moment loses at most the shard being embedded and never leaves a half-written one that a
rerun would trust. The folder name carries a fingerprint of the model, the images and the options that change what
a shard holds (:func:`build_fingerprint`): a rerun with other inputs starts afresh instead of reusing stale shards
(and removes them). Shards are read back memory-mapped, one at a time, so the index is assembled without any
process holding the whole gallery.

Why not ``datasets``' own ``map(..., cache_file_name)`` checkpoints: they resume only within one process's cache
and rewrite the whole Arrow file per job; a shard file per unit of work is what lets processes of an ``accelerate
launch`` take whole shards and a rerun skip the finished ones (clip-retrieval's embedding reader writes parts the
same way).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..utils.atomic_files import write_atomic

logger = logging.getLogger(__name__)

# Items per shard: at most this much work is lost to a kill. 10,000 images are about 30 s for the main job's model on
# two CPU cores (300-400 images/s in batches: README "Serve"), minutes for a 224 px ResNet-50, seconds on a GPU; 20 MB
# of float32 embeddings at 512 dimensions; 10^4 shards for 10^8 images (files a folder holds without trouble). A
# gallery under 10,000 images is one shard, i.e. the build of before. Smaller shards buy little: the per-shard cost
# (a DataLoader, its workers, four files) grows while the work a kill loses is already small.
DEFAULT_SHARD_SIZE = 10_000
WORK_SUFFIX = ".build"
PLAN_FILE = "plan.json"
FORMAT = 1  # of the shard files; part of the fingerprint


def work_root(output_dir: str | os.PathLike) -> Path:
    """``.<name>.build`` beside the output folder (on the same file system, which every process must see)."""
    output = Path(output_dir)
    return output.parent / f".{output.name}{WORK_SUFFIX}"


def build_fingerprint(model: dict[str, Any], source: str, options: dict[str, Any], shard_size: int) -> str:
    """A short hash of what the shards hold: the model reference (its weight fingerprint), the gallery's
    fingerprint, the options that change an embedding or a record, and the shard size."""
    payload = {"format": FORMAT, "model": model, "source": source, "options": options, "shard_size": shard_size}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ShardPlan:
    """``count`` gallery rows cut into shards of ``shard_size``; shard ``i`` is rows ``[i·size, (i+1)·size)``."""

    count: int
    shard_size: int

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"--shard_size must be >= 1, got {self.shard_size}.")

    @property
    def num_shards(self) -> int:
        return math.ceil(self.count / self.shard_size)

    def rows(self, shard: int) -> tuple[int, int]:
        """``(start, stop)`` of ``shard``."""
        start = shard * self.shard_size
        return start, min(self.count, start + self.shard_size)

    def owned(self, rank: int, world: int) -> list[int]:
        """The shards process ``rank`` of ``world`` embeds: every ``world``-th, starting at ``rank``."""
        return list(range(rank, self.num_shards, world))


@dataclass
class Shard:
    """One finished shard read back: ``embeddings`` (memory-mapped), ``items`` (an Arrow table), ``tokens``."""

    index: int
    embeddings: np.ndarray
    items: pa.Table
    tokens: np.ndarray | None
    skipped: list[str]


class ShardFolder:
    """The shards of one build (one fingerprint) in ``root/<fingerprint>/``."""

    def __init__(self, root: Path, fingerprint: str, plan: ShardPlan) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.plan = plan
        self.directory = self.root / fingerprint

    def _file(self, shard: int, suffix: str) -> Path:
        return self.directory / f"shard-{shard:06d}.{suffix}"

    def prepare(self) -> None:
        """Create the folder (main process only) and remove the shards of other fingerprints: stale work."""
        if self.root.is_dir():
            for other in self.root.iterdir():
                if other.name != self.fingerprint:
                    logger.info("Removing the shards of an earlier build with other inputs: %s", other)
                    shutil.rmtree(other, ignore_errors=True) if other.is_dir() else other.unlink(missing_ok=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        plan = {"fingerprint": self.fingerprint, "count": self.plan.count, "shard_size": self.plan.shard_size}
        write_atomic(self.directory / PLAN_FILE, json.dumps(plan))

    def is_done(self, shard: int) -> bool:
        return self._file(shard, "done.json").is_file()

    def done(self) -> list[int]:
        return [i for i in range(self.plan.num_shards) if self.is_done(i)]

    def write(
        self,
        shard: int,
        embeddings: np.ndarray,
        items: pa.Table,
        tokens: np.ndarray | None = None,
        skipped: list[str] | None = None,
    ) -> None:
        """Write one shard's files atomically, then its marker (the shard counts from that moment on)."""
        if len(embeddings) != items.num_rows or (tokens is not None and len(tokens) != len(embeddings)):
            raise ValueError(f"shard {shard}: {len(embeddings)} embeddings for {items.num_rows} items.")
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
        write_atomic(self._file(shard, "embeddings.npy"), lambda path: _save_npy(path, vectors))
        write_atomic(self._file(shard, "items.arrow"), lambda path: _save_arrow(path, items))
        if tokens is not None:
            stored = np.ascontiguousarray(tokens, dtype=np.float16)
            write_atomic(self._file(shard, "tokens.npy"), lambda path: _save_npy(path, stored))
        marker = {
            "shard": shard,
            "rows": list(self.plan.rows(shard)),
            "count": len(vectors),
            "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
            "tokens": tokens is not None,
            "skipped": list(skipped or []),
        }
        write_atomic(self._file(shard, "done.json"), json.dumps(marker))

    def read(self, shard: int) -> Shard:
        """A finished shard, its arrays memory-mapped (nothing read until used)."""
        marker = json.loads(self._file(shard, "done.json").read_text())
        embeddings = np.load(self._file(shard, "embeddings.npy"), mmap_mode="r")
        items = pa.ipc.open_file(pa.memory_map(str(self._file(shard, "items.arrow")))).read_all()  # zero-copy
        tokens = np.load(self._file(shard, "tokens.npy"), mmap_mode="r") if marker["tokens"] else None
        if len(embeddings) != marker["count"] or items.num_rows != marker["count"]:
            raise ValueError(f"shard {shard} in {self.directory} does not match its marker: remove the folder.")
        return Shard(shard, embeddings, items, tokens, marker["skipped"])

    def shards(self) -> Iterator[Shard]:
        """Every shard, in gallery order (all must be finished)."""
        for shard in range(self.plan.num_shards):
            if not self.is_done(shard):
                raise RuntimeError(f"shard {shard} of {self.directory} is not finished: its process did not end well.")
            yield self.read(shard)

    def remove(self) -> None:
        """Remove the work folder once the index is saved."""
        shutil.rmtree(self.root, ignore_errors=True)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as stream:
        np.save(stream, array)


def _save_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
