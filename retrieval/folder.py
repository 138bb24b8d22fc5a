"""An :class:`~.index.EmbeddingIndex`'s folder: save, load (format 2 memory-mapped, or format 1), and atomic changes.

A change (``add``, ``remove``, ``compact``) on an index bound to a folder writes its new files (a segment, a
tombstone bitmap) next to the old ones, then swaps ``metadata.json`` in (``utils.atomic_files.write_atomic``: fsync,
``os.replace``). A kill before the swap leaves the previous manifest, which names only the previous files: the index
reads as before, and the orphans are deleted by the next change. Files named by neither the new manifest nor the
previous one are deleted after the swap, so a reader that read the previous manifest a moment ago can still open
its files. One writer at a time: a change holds an exclusive ``flock`` on ``.lock`` in the folder, and refuses to
write over a manifest another process has changed since this one read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa

from ..utils.atomic_files import staged_directory, write_atomic
from ..utils.fault_points import fault_point
from . import kinds
from .columns import item_table
from .head_tokens import HEAD_TOKENS_FILE, HeadTokens
from .idhash import HASH_NAME
from .segments import Segment
from .selection import set_bits, unpack
from .storage import (
    EMBEDDINGS_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    METADATA_FILE,
    TOMBSTONES_FILE,
    TRAINED_FILE,
    IndexFormatError,
    is_index_file,
    manifest_files,
    read_embeddings,
    read_faiss,
    read_metadata,
)

logger = logging.getLogger(__name__)
LOCK_FILE = ".lock"


# -- segments -------------------------------------------------------------------------------------------------------
def build_segment(
    index: Any, start: int, table: pa.Table, vectors: np.ndarray, tokens: HeadTokens | None, target_recall: float = 0.95
) -> tuple[Segment, dict[str, Any] | None]:
    """A new in-memory segment of ``index`` over ``vectors`` (rows ``start`` ...), and a calibration record when the
    index's search setting was measured on it (the first segment of an approximate index)."""
    rows = np.arange(start, start + len(vectors), dtype=np.int64)
    if index.kind == "ivfpq":
        from .ivfpq_kind import build_ivfpq

        faiss_index, calibration = build_ivfpq(index, vectors, rows, target_recall)
    else:
        quantizer = index.trained.quantizer if index.trained is not None else None
        faiss_index, calibration = kinds.build(index.kind, vectors, rows, index.params, target_recall, quantizer)
        if index.kind == "ivf" and index.trained is None:
            index.trained = faiss.IndexIVFFlat(faiss.clone_index(faiss_index.quantizer), index.dim,
                                               faiss_index.nlist, faiss.METRIC_INNER_PRODUCT)  # fmt: skip
    stored = vectors.astype(np.float16) if index.kind == "ivfpq" else vectors
    return Segment.in_memory(
        index.kind, start, table, faiss_index, stored, tokens.tokens if tokens else None
    ), calibration


def with_removed(index: Any, rows: np.ndarray, total: int) -> np.ndarray:
    """The index's tombstone bitmap grown to ``total`` rows, with ``rows`` set too."""
    return set_bits(index.removed, rows, total)


def compacted_segment(index: Any) -> Segment:
    """One in-memory segment of the index's live rows, in row order (a new faiss index over them, same settings)."""
    tables, vectors, tokens = [], [], []
    for segment in index.segments:
        keep = ~unpack(index.removed, segment.start, segment.start + segment.rows)
        live = np.flatnonzero(keep)
        tables.append(segment.table.filter(pa.array(keep)))  # batch by batch (``take`` would concatenate first)
        vectors.append(np.asarray(segment.vectors[live], dtype=np.float32))
        if segment.tokens is not None:
            tokens.append(np.asarray(segment.tokens[live]))
    table = pa.concat_tables(tables)
    stacked = np.concatenate(vectors) if vectors else np.zeros((0, index.dim), np.float32)
    head = HeadTokens(np.concatenate(tokens), index.token_stage) if index.token_shape is not None else None
    segment, _ = build_segment(index, 0, table, stacked, head)
    return segment


# -- changes --------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder's ``.lock`` file (POSIX ``flock``; where there is none, no lock is taken)."""
    try:
        import fcntl
    except ImportError:  # Windows: one writer at a time is then the caller's to ensure
        yield
        return
    with open(folder / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def change(
    index: Any, segments: list[Segment], removed: np.ndarray, build: Callable[[Path, str], Segment] | None = None
) -> None:
    """Make ``segments`` and the tombstone bitmap ``removed`` the index's content; persisted first when bound.

    ``build(folder, name)``: writes a segment straight into the bound folder under the lock (a streamed compaction)
    and returns it; it then replaces ``segments``."""
    if index.folder is None:
        index._set_segments(segments, removed)
        return
    folder = index.folder
    with _locked(folder):
        on_disk = read_metadata(folder / METADATA_FILE)
        if on_disk.get("generation", 0) != index.generation:
            raise RuntimeError(
                f"the index folder {folder} was changed by another writer since this index was loaded (generation "
                f"{on_disk.get('generation', 0)}, not {index.generation}): load it again, then change it."
            )
        generation = index.generation + 1
        if build is not None:
            name = f"{index.next_segment:06d}"
            index.next_segment += 1
            segments = [build(folder, name)]
        manifest = _write_content(index, folder, segments, removed, generation)
        fault_point("index_change")  # the new files are written, the manifest not yet swapped
        write_atomic(folder / METADATA_FILE, json.dumps(manifest, ensure_ascii=False))
        keep = manifest_files(manifest) | index.bound_files
        for path in folder.iterdir():
            if is_index_file(path.name) and path.name not in keep:
                with contextlib.suppress(OSError):  # still mapped where that forbids deleting: the next change retries
                    path.unlink(missing_ok=True)
    _open_into(index, folder, manifest)


def _write_content(
    index: Any, folder: Path, segments: list[Segment], removed: np.ndarray, generation: int
) -> dict[str, Any]:
    """Write the segments not yet in ``folder`` (and the tombstones, the trained template); the manifest to swap."""
    for segment in segments:
        if segment.folder != folder or segment.name is None:
            name = f"{index.next_segment:06d}"
            index.next_segment += 1
            segment.files = segment.write(folder, name, index.trained)
            segment.name, segment.folder = name, folder
    rows = sum(s.rows for s in segments)
    bits = np.zeros((rows + 7) // 8, np.uint8)
    bits[: min(len(bits), len(removed))] = removed[: len(bits)]
    removed_count = int(np.unpackbits(bits, bitorder="little")[:rows].sum())
    tombstones = None
    if removed_count:
        tombstones = TOMBSTONES_FILE.format(f"{generation:06d}")
        np.save(folder / tombstones, bits)
    trained = None
    if index.trained is not None:
        trained = TRAINED_FILE.format(f"{generation:06d}")
        faiss.write_index(index.trained, str(folder / trained))
    return manifest(index, segments, rows, removed_count, tombstones, trained, generation)


def manifest(
    index: Any, segments: list[Segment], rows: int, removed: int, tombstones: str | None, trained: str | None,
    generation: int,
) -> dict[str, Any]:  # fmt: skip
    """The content of ``metadata.json`` (format 2)."""
    from importlib.metadata import version  # not `from .. import __version__`: the package imports this module

    return {
        "format_version": FORMAT_VERSION,
        "library": f"crossmetric {version('crossmetric')}",
        "kind": index.kind,
        "metric": "inner_product",
        "dim": index.dim,
        "count": rows - removed,
        "rows": rows,
        "removed": removed,
        "params": index.params,
        "calibration": index.calibration,
        "model": index.model,
        "head_tokens": index.head_tokens_info(),
        "columns": [field.name for field in segments[0].table.schema][3:] if segments else [],
        "id_hash": HASH_NAME,
        "segments": [s.entry() for s in segments],
        "tombstones": tombstones,
        "trained": trained,
        "generation": generation,
        "next_segment": index.next_segment,
    }


# -- save and load --------------------------------------------------------------------------------------------------
def save(index: Any, target: Path, *, bind: bool) -> Path:
    """Write the whole index into a fresh folder swapped in at ``target``; bind the index to it with ``bind``."""
    if target.exists() and not target.is_dir():
        raise ValueError(f"cannot save the index to {str(target)!r}: it is a file, not a folder.")
    copies = [dataclasses.replace(s) for s in index.segments]  # the index's own segments stay as they are
    saved_next = index.next_segment
    index.next_segment = 1
    try:
        with staged_directory(target) as staging:
            content = _write_content(index, staging, copies, index.removed, 0)
            write_atomic(staging / METADATA_FILE, json.dumps(content, ensure_ascii=False))
    finally:
        if not bind:
            index.next_segment = saved_next
    if bind:
        index.bound_files = set()
        _open_into(index, target, read_metadata(target / METADATA_FILE))
    return target


def _open_into(index: Any, folder: Path, meta: dict[str, Any]) -> None:
    """Point ``index`` at the (format 2) content ``meta`` describes in ``folder``, memory-mapped."""
    token_shape = meta["head_tokens"]["shape"] if meta.get("head_tokens") else None
    segments, start = [], 0
    for entry in meta["segments"]:
        segments.append(Segment.open(folder, entry, meta["kind"], start, meta["dim"], token_shape))
        start += entry["rows"]
    removed = np.zeros((start + 7) // 8, np.uint8)
    if meta.get("tombstones"):
        path = folder / meta["tombstones"]
        try:
            stored = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise IndexFormatError(f"{path} is missing or unreadable: {error}") from error
        if stored.dtype != np.uint8 or stored.shape != removed.shape:
            raise IndexFormatError(f"{path} holds {stored.dtype} {stored.shape}, not the {removed.shape} bitmap.")
        removed = stored
    for segment in segments:
        if segment.index is not None:
            kinds.apply_search_params(segment.index, meta["kind"], meta.get("params") or {})
    if meta.get("trained"):
        index.trained = read_faiss(folder / meta["trained"], 0, meta["dim"], meta["kind"])
    index._set_segments(segments, removed)
    if index.removed_count != meta["rows"] - meta["count"]:
        raise IndexFormatError(
            f"{folder / METADATA_FILE}: count disagrees with the tombstones in {meta['tombstones']}."
        )
    index.folder = folder
    index.generation = meta["generation"]
    index.next_segment = meta.get("next_segment", len(segments) + 1)
    index.bound_files = manifest_files(meta)


def load(cls: Any, folder: Path) -> Any:
    """The index saved in ``folder`` (format 2: memory-mapped; format 1: read onto the heap, as it always was)."""
    if not folder.is_dir():
        hint = ""
        backups = sorted(folder.parent.glob(f".{folder.name}.old-*")) if folder.parent.is_dir() else []
        if backups:
            hint = f" A save was interrupted while swapping folders; the previous index is in {backups[-1]}."
        raise FileNotFoundError(f"index folder {str(folder)!r} does not exist.{hint}")
    if not (folder / METADATA_FILE).is_file():
        raise IndexFormatError(
            f"{folder / METADATA_FILE} is missing: not an index folder written by EmbeddingIndex.save."
        )
    meta = read_metadata(folder / METADATA_FILE)
    index = cls.__new__(cls)
    token_info = None
    if meta.get("head_tokens"):
        token_info = (list(meta["head_tokens"]["shape"]), meta["head_tokens"].get("token_stage"))
    index._setup(meta["kind"], meta["dim"], meta.get("params") or {}, meta.get("calibration"), meta.get("model") or {},
                 token_info)  # fmt: skip
    if meta["format_version"] == 1:
        _load_v1(index, folder, meta)
    else:
        _open_into(index, folder, meta)
    return index


def _load_v1(index: Any, folder: Path, meta: dict[str, Any]) -> None:
    """Format 1: the three (four) files read onto the heap and checked against each other; bound to ``folder`` so
    that its first change rewrites it as format 2."""
    for name in (EMBEDDINGS_FILE, INDEX_FILE):
        if not (folder / name).is_file():
            raise IndexFormatError(
                f"{folder / name} is missing: an index folder holds {METADATA_FILE}, {EMBEDDINGS_FILE} and "
                f"{INDEX_FILE} (written by EmbeddingIndex.save)."
            )
    count, dim, kind = meta["count"], meta["dim"], meta["kind"]
    embeddings = read_embeddings(folder / EMBEDDINGS_FILE, count, dim)
    faiss_index = read_faiss(folder / INDEX_FILE, count, dim, kind)
    if kind == "ivf":
        faiss_index.make_direct_map()  # lets reconstruct() check the stored vectors against the embeddings file
    if not np.array_equal(faiss_index.reconstruct(0), embeddings[0]) or not np.array_equal(
        faiss_index.reconstruct(count - 1), embeddings[count - 1]
    ):
        raise IndexFormatError(
            f"{folder / INDEX_FILE} holds other vectors than {folder / EMBEDDINGS_FILE}: the files come from "
            "different saves. Rebuild the index."
        )
    tokens = HeadTokens.load(folder, meta["head_tokens"], count) if meta.get("head_tokens") else None
    try:
        table = item_table(meta["ids"], meta.get("labels"), meta.get("paths"), None, count)
    except ValueError as error:
        raise IndexFormatError(f"{folder / METADATA_FILE}: {error}") from error
    kinds.apply_search_params(faiss_index, kind, index.params)
    if kind == "ivf":
        index.trained = faiss.IndexIVFFlat(faiss.clone_index(faiss_index.quantizer), dim, faiss_index.nlist,
                                           faiss.METRIC_INNER_PRODUCT)  # fmt: skip
    segment = Segment.in_memory(kind, 0, table, faiss_index, embeddings, tokens.tokens if tokens else None)
    index._set_segments([segment], np.zeros(0, np.uint8))
    index.folder = folder
    index.generation = 0
    index.bound_files = {METADATA_FILE, EMBEDDINGS_FILE, INDEX_FILE, HEAD_TOKENS_FILE}


def info(index: Any) -> dict[str, Any]:
    """What ``crossmetric index info`` prints: kind, counts, bytes on disk, model, settings, segments, columns."""
    on_disk = None
    if index.folder is not None and index.folder.is_dir():
        on_disk = sum((index.folder / name).stat().st_size for name in index.bound_files
                      if (index.folder / name).is_file()) + (index.folder / METADATA_FILE).stat().st_size  # fmt: skip
    return {
        "kind": index.kind,
        "count": len(index),
        "removed": index.removed_count,
        "rows": index.rows,
        "dim": index.dim,
        "bytes_on_disk": on_disk,
        "model": index.model,
        "params": index.params,
        "calibration": index.calibration,
        "segments": len(index.segments),
        "columns": index.columns(),
        "head_tokens": index.head_tokens_info(),
        "folder": str(index.folder) if index.folder is not None else None,
    }
