"""Thumbnails of gallery images for the search page, read only from the files the index recorded at build time.

A request names an index entry by its id; the id is looked up in the loaded index (``index.records([id])``, a hash
lookup in the index's memory-mapped files) and the file read is the path that entry recorded. Nothing from the
request is ever joined to a path or opened, so no request reaches any other file. The file is decoded with the
server's own checks (a decompression bomb in the gallery is refused like one in a request) and re-encoded small
(JPEG, at most :data:`THUMBNAIL_SIZE` pixels a side), so the answer is always an image, whatever the file held.
Recent thumbnails are kept in a small cache.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from .errors import ServeError
from .index_watch import LoadedIndex

THUMBNAIL_SIZE = 160
CACHE_ENTRIES = 512


class Thumbnails:
    """JPEG thumbnails of index entries, made with ``decode`` (bytes -> RGB image, raising on a bad file)."""

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self._cache: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()  # requests make thumbnails in several worker threads

    def get(self, loaded: LoadedIndex | None, entry_id: str) -> bytes:
        """The thumbnail of ``entry_id`` in ``loaded`` (blocking: run it off the event loop)."""
        if loaded is None:
            raise ServeError("not_found", "this server has no index, so no gallery thumbnails.")
        key = (loaded.generation, entry_id)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        record = loaded.index.records([entry_id])[0]
        if record is None:
            raise ServeError("not_found", "no entry of the index has this id.")
        if record.get("path") is None:
            raise ServeError("not_found", "this index entry recorded no file (it was built from a dataset).")
        try:
            data = Path(record["path"]).read_bytes()
            image = self.decode(data)
        except (OSError, ValueError):
            raise ServeError("not_found", "the file this entry recorded is gone or no longer an image.") from None
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=85)
        thumbnail = out.getvalue()
        with self._lock:
            self._cache[key] = thumbnail
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return thumbnail
