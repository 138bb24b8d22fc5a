"""The served index, and its reload when ``crossmetric index build`` rewrites the folder (a watch, not a signal).

Chosen: a **watch** of the index folder. Every ``--index_poll_interval`` seconds (default 2) the server stats
``INDEX/metadata.json``; ``EmbeddingIndex.save`` swaps a complete new folder into place, so a rebuild shows as a
new inode / mtime / size of that file. The new index is then loaded in a thread, checked (the three files agree, the
embedding size is the model's) and swapped in with one assignment; a request already searching keeps the index it
started with. A load that fails (the folder caught between the two renames of the swap, files from two saves, another
model's index) keeps the old index and is retried at the next poll, so no request fails because of a rebuild. When
the server re-ranks, every load (the first one and each reload) is also checked for the re-ranker's head tokens: a
rebuild without them is refused like any unreadable index, and the previous one kept.

A watch rather than SIGHUP: rebuilding is then the whole procedure (no PID to find, works across containers that
share the folder), and it cannot kill a server started without the handler. An index given as a Hub id is not
watched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..retrieval.hub import DEFAULT_SUBFOLDER
from ..retrieval.index import EmbeddingIndex
from ..retrieval.milvus_index import MilvusLocation
from ..retrieval.storage import METADATA_FILE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedIndex:
    """One loaded index (any :class:`~crossmetric.retrieval.protocol.GalleryIndex`; nothing per item is derived from
    it: thumbnails ask ``index.records([id])``)."""

    index: EmbeddingIndex
    source: str
    generation: int
    loaded_at: float = field(default_factory=time.time)

    @classmethod
    def of(cls, index: EmbeddingIndex, source: str, generation: int) -> LoadedIndex:
        return cls(index, source, generation)

    def info(self) -> dict[str, Any]:
        return {
            "source": self.source, "kind": self.index.kind, "size": len(self.index), "dim": self.index.dim,
            "generation": self.generation, "loaded_at": self.loaded_at,
        }  # fmt: skip


def find_index(index: str | MilvusLocation | None, model_source: Path | str) -> tuple[Any, bool]:
    """``(where the index is, whether it is a local folder to watch)`` for ``--index`` (None: ``MODEL/index/``); a
    ``MilvusLocation`` (``--milvus``) is opened as it is, unwatched (Milvus serves its own changes)."""
    if isinstance(index, MilvusLocation):
        return index, False
    if index is None:
        if isinstance(model_source, Path) and (model_source / DEFAULT_SUBFOLDER / METADATA_FILE).is_file():
            return model_source / DEFAULT_SUBFOLDER, True
        return None, False
    path = Path(index).expanduser()
    if path.is_dir():
        return path, True
    if path.exists():
        raise ValueError(f"--index {index!r} is a file: pass an index folder written by `crossmetric index build`.")
    if index.startswith((".", "/", "~")) or index.count("/") != 1:
        raise ValueError(f"--index {index!r}: no such folder (and not a Hub id of the form user/name).")
    return index, False


def _signature(folder: Path) -> tuple[int, int, int] | None:
    """What changes when a save swaps the folder: ``metadata.json``'s inode, mtime and size (None: not there)."""
    try:
        stat = os.stat(folder / METADATA_FILE)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class IndexWatch:
    """Holds the current :class:`LoadedIndex` and replaces it when the watched folder is rebuilt.

    Args:
        location: an index folder or Hub id (None: the server has no index; ``/search`` answers 424).
        watch: poll ``location`` (a local folder) for rebuilds.
        dim: the model's embedding size; an index of another size is refused.
        poll_interval: seconds between polls (0: no reload).
        on_load: called with each newly loaded index (metrics).
        check: called with each index read, before it is served; raises ``ValueError`` to refuse it (re-ranking:
            an index without the re-ranker's head tokens).
    """

    def __init__(
        self,
        location: Path | str | None,
        watch: bool,
        dim: int,
        poll_interval: float = 2.0,
        on_load: Any = None,
        check: Callable[[EmbeddingIndex], None] | None = None,
    ) -> None:
        self.location = location
        self.watch = watch and poll_interval > 0
        self.dim = dim
        self.poll_interval = poll_interval
        self.on_load = on_load
        self.check = check
        self.current: LoadedIndex | None = None
        self._signature: tuple[int, int, int] | None = None
        self._failed: tuple[int, int, int] | None = None  # a rebuilt folder that did not load (not retried)
        self._task: asyncio.Task | None = None

    def load(self) -> LoadedIndex | None:
        """Load the index now (blocking; the first load, at startup): errors propagate."""
        if self.location is None:
            return None
        signature = _signature(Path(self.location)) if self.watch else None
        index = self._read()
        self._install(index, signature)
        return self.current

    def _read(self) -> EmbeddingIndex:
        if self.watch:
            index = EmbeddingIndex.load(self.location)  # type: ignore[arg-type]
        elif isinstance(self.location, MilvusLocation):
            index = self.location.open()
        else:
            index = EmbeddingIndex.from_pretrained(self.location)  # type: ignore[arg-type]
        if index.dim != self.dim:
            raise ValueError(
                f"the index {self.location} holds {index.dim}-dimensional embeddings but the model makes "
                f"{self.dim}-dimensional ones: build the index with this model."
            )
        if self.check is not None:
            self.check(index)
        return index

    def _install(self, index: EmbeddingIndex, signature: tuple[int, int, int] | None) -> None:
        generation = 0 if self.current is None else self.current.generation + 1
        self.current = LoadedIndex.of(index, str(self.location), generation)
        self._signature = signature
        if self.on_load is not None:
            self.on_load(self.current)

    def start(self) -> None:
        """Start polling (on the running event loop) when the index is a local folder."""
        if self.watch and self.location is not None:
            self._task = asyncio.get_running_loop().create_task(self._poll(), name="crossmetric-index-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        folder = Path(self.location)  # type: ignore[arg-type]
        while True:
            await asyncio.sleep(self.poll_interval)
            signature = _signature(folder)
            if signature is None or signature in (self._signature, self._failed):
                continue  # unchanged, or caught between the two renames of a swap: look again next time
            try:
                index = await asyncio.to_thread(self._read)
            except Exception as error:  # keep serving the old index; a half-swapped folder settles by the next poll
                if _signature(folder) == signature:  # the folder is settled and still unreadable: say so once
                    self._failed = signature
                    logger.warning("Index %s changed but could not be loaded (%s); still serving the previous one.",
                                   folder, error)  # fmt: skip
                continue
            if _signature(folder) != signature:
                continue  # rewritten again while it loaded: load the newer one next time
            before = len(self.current.index) if self.current else 0
            self._install(index, signature)
            logger.info("Reloaded the index %s: %d -> %d entries.", folder, before, len(index))
