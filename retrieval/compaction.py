"""Compaction of an index bound to a folder, streamed: the live rows are copied batch by batch into one new segment.

An in-memory compaction (:func:`.folder.compacted_segment`) gathers every live vector, id and token first; for a
folder of 10^7 items that is gigabytes of heap. Here each segment's Arrow batches, vectors and tokens are read from
their memory-mapped files a block at a time and appended to the new segment's files (:class:`.builder.GrowingArray`);
``exact`` appends straight into its faiss file, ``ivfpq`` encodes block by block into on-disk lists
(:func:`.ivfpq.write_ondisk`). ``hnsw`` and ``ivf`` then build their faiss index from the new memory-mapped vectors
(faiss keeps a graph / inverted lists in RAM while it builds them). Nothing is renamed into place: the files get a new
segment name and only the manifest swap (:func:`.folder.change`) makes them the index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from . import kinds
from .builder import GrowingArray, build_lookup_from_hashes
from .idhash import hash_ids
from .segments import Segment
from .selection import unpack
from .storage import SEGMENT_FILES

_BLOCK = 1 << 16


def write_compacted(index: Any, folder: Path, name: str) -> Segment:
    """Write the live rows of ``index`` as segment ``name`` in ``folder``; the segment, opened from its files."""
    names = {key: pattern.format(name) for key, pattern in SEGMENT_FILES.items()}
    kind, dim = index.kind, index.dim
    stored = np.float16 if kind == "ivfpq" else np.float32
    target = names["index"] if kind == "exact" else names["embeddings"]
    vectors = GrowingArray(folder / target, stored, 45 if kind == "exact" else 128)
    tokens = GrowingArray(folder / names["tokens"], np.float16) if index.token_shape is not None else None
    hashes: list[np.ndarray] = []
    writer = pa.ipc.new_file(str(folder / names["items"]), index.schema)
    for segment in index.segments:
        alive = ~unpack(index.removed, segment.start, segment.start + segment.rows)
        offset = 0
        for batch in segment.table.to_batches():
            keep = alive[offset : offset + len(batch)]
            local = np.flatnonzero(keep) + offset
            offset += len(batch)
            if not len(local):
                continue
            kept = batch.filter(pa.array(keep))
            writer.write_batch(kept)
            hashes.append(hash_ids(kept.column(0).to_pylist()))
            vectors.append(np.asarray(segment.vectors[local], dtype=stored))
            if tokens is not None:
                tokens.append(np.asarray(segment.tokens[local]))
    writer.close()
    count = vectors.rows
    if count == 0:
        vectors.stream.close()
        (folder / target).unlink()
        if tokens is not None:
            tokens.stream.close()
            (folder / names["tokens"]).unlink()
        empty = index.schema.empty_table()
        return Segment(kind, 0, empty, None, np.zeros((0, dim), stored), None, np.zeros((2, 0), np.uint64))
    if tokens is not None:
        tokens.close()
    lookup = build_lookup_from_hashes(np.concatenate(hashes))
    np.save(folder / names["idhash"], lookup)
    files = [names["items"], names["index"], names["idhash"]] + ([names["tokens"]] if tokens is not None else [])
    if kind == "exact":
        vectors.close(kinds.flat_header(dim, count))
    else:
        vectors.close()
        files += [names["embeddings"]] + ([names["ivfdata"]] if kind in ("ivf", "ivfpq") else [])
        _build_faiss(index, folder, names, count)
    entry = {"name": name, "rows": count, "files": files}
    segment = Segment.open(folder, entry, kind, 0, dim, index.token_shape)
    kinds.apply_search_params(segment.index, kind, index.params)
    return segment


def _build_faiss(index: Any, folder: Path, names: dict[str, str], count: int) -> None:
    """The faiss file(s) of an approximate kind over the new segment's memory-mapped vectors (same settings)."""
    vectors = np.load(folder / names["embeddings"], mmap_mode="r")
    rows = np.arange(count, dtype=np.int64)
    stem = names["index"].rsplit(".", 1)[0]
    if index.kind == "ivfpq":
        from .ivfpq import write_ondisk

        blocks = ((vectors[s : s + _BLOCK], rows[s : s + _BLOCK]) for s in range(0, count, _BLOCK))
        with kinds.quiet_stdout():
            write_ondisk(index.trained, blocks, folder, stem)
        return
    quantizer = index.trained.quantizer if index.trained is not None else None
    built, _ = kinds.build(index.kind, vectors, rows, dict(index.params), quantizer=quantizer)
    if index.kind == "ivf":
        with kinds.quiet_stdout():
            kinds.write_ivf_ondisk(built, index.trained, folder, stem)
    else:
        faiss.write_index(built, str(folder / names["index"]))
