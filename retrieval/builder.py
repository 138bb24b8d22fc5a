"""Build an index folder chunk by chunk (a sharded build's shards), without gathering the gallery in RAM.

:class:`IndexBuilder` appends each chunk's items to files in a staging folder next to the target (Arrow record
batches, the vectors and head tokens as ``.npy`` files that grow; for ``exact`` the vectors go straight into the
faiss file, whose header is written last). :meth:`IndexBuilder.finish` builds the faiss index of the kind from the
memory-mapped vectors (IVF kinds train on a sample; an approximate index calibrates its search setting), writes the
manifest and swaps the folder into place, as ``EmbeddingIndex.save`` does. What stays in RAM per item: the 16-byte
id hashes while they are sorted at the end; and, for ``hnsw`` and ``ivf``, what faiss itself keeps while it builds
(the graph, the lists). ``ivfpq`` encodes chunk by chunk into on-disk lists (:mod:`.ivfpq`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ..utils.atomic_files import write_atomic
from .columns import conform, item_table
from .head_tokens import HeadTokens
from .idhash import hash_ids
from .kinds import flat_header
from .storage import KINDS, METADATA_FILE, SEGMENT_FILES
from .vectors import normalise_rows

SEGMENT = "000001"
_NPY_HEADER = 128


class GrowingArray:
    """A ``.npy`` file that rows are appended to; its header (the final shape) is written by :meth:`close`.

    The ``.npy`` header is padded to a fixed 128 bytes (the format allows any multiple of 64), so the data can be
    streamed first and the shape filled in last. ``header``/``header_size`` instead write another fixed header
    (the faiss flat index's).
    """

    def __init__(self, path: Path, dtype: Any, header_size: int = _NPY_HEADER) -> None:
        self.path, self.dtype, self.header_size = path, np.dtype(dtype), header_size
        self.stream = open(path, "wb")  # noqa: SIM115 - kept open across appends, closed by close()
        self.stream.write(b"\0" * header_size)
        self.rows = 0
        self.inner: tuple[int, ...] | None = None

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if self.inner is None:
            self.inner = tuple(array.shape[1:])
        elif tuple(array.shape[1:]) != self.inner:
            raise ValueError(f"a chunk of shape {array.shape[1:]} does not continue rows of shape {self.inner}.")
        self.stream.write(array.tobytes())
        self.rows += len(array)

    def close(self, header: bytes | None = None) -> None:
        if header is None:
            header = _npy_header(self.dtype, (self.rows, *(self.inner or ())))
        assert len(header) == self.header_size
        self.stream.seek(0)
        self.stream.write(header)
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    body = text.encode("latin1")
    padding = _NPY_HEADER - 10 - len(body) - 1
    return b"\x93NUMPY\x01\x00" + np.uint16(_NPY_HEADER - 10).tobytes() + body + b" " * padding + b"\n"


class IndexBuilder:
    """Write an index folder at ``directory`` from chunks (see the module docstring and ``/tmp`` plan's signature).

    Args:
        directory: the index folder to create (replaced atomically by :meth:`finish` when it exists).
        kind: ``"exact"``, ``"hnsw"``, ``"ivf"`` or ``"ivfpq"``.
        model: the reference of the model that made the embeddings.
        token_stage: the re-ranker's token stage, when chunks carry head tokens.
        progress: show progress bars while the index is built.
        index_options: the constructor's settings (``hnsw_m``, ``ef_search``, ``nlist``, ``nprobe``, ``max_memory``,
            ``refine``, ``target_recall``, ...).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        kind: str = "exact",
        model: Mapping[str, Any] | None = None,
        token_stage: str | None = None,
        progress: bool = False,
        **index_options: Any,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {KINDS}.")
        self.target = Path(directory)
        if self.target.exists() and not self.target.is_dir():
            raise ValueError(f"cannot build the index at {str(self.target)!r}: it is a file, not a folder.")
        self.kind, self.model, self.token_stage = kind, dict(model or {}), token_stage
        self.progress, self.options = progress, index_options
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.partial-", dir=self.target.parent))
        self.staging.chmod(0o755)
        self.names = {key: pattern.format(SEGMENT) for key, pattern in SEGMENT_FILES.items()}
        vectors_file = self.names["index"] if kind == "exact" else "vectors.f32.npy"
        self.vectors = GrowingArray(self.staging / vectors_file, np.float32, 45 if kind == "exact" else _NPY_HEADER)
        self.tokens: GrowingArray | None = None
        self.hashes = GrowingArray(self.staging / "hashes.npy", np.uint64)
        self.writer: Any = None
        self.schema: pa.Schema | None = None
        self.dim: int | None = None

    @property
    def count(self) -> int:
        """Rows appended so far."""
        return self.vectors.rows

    def __enter__(self) -> IndexBuilder:
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        if error is not None:
            self.abort()

    def append(
        self,
        embeddings: Any,
        ids: Any,
        labels: Any = None,
        paths: Any = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        head_tokens: Any = None,
    ) -> None:
        """Append one chunk of items (ids unique over all chunks; checked within the chunk now, across at the end)."""
        vectors = normalise_rows(embeddings, "embeddings")
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise ValueError(f"embeddings have dimension {vectors.shape[1]}, earlier chunks {self.dim}.")
        self.dim = vectors.shape[1]
        table = item_table(ids, labels, paths, metadata, len(vectors))
        if self.schema is None:
            self.schema = table.schema
            self.writer = pa.ipc.new_file(str(self.staging / self.names["items"]), self.schema)
        else:
            table = conform(table, self.schema)
        if (head_tokens is None) != (self.tokens is None and self.count > 0) and self.count > 0:
            raise ValueError("every chunk carries head tokens, or none does.")
        if head_tokens is not None:
            stage = getattr(head_tokens, "token_stage", self.token_stage)
            tokens = HeadTokens.from_array(getattr(head_tokens, "tokens", head_tokens), stage, len(vectors))
            self.token_stage = stage
            if self.tokens is None:
                self.tokens = GrowingArray(self.staging / self.names["tokens"], np.float16)
            self.tokens.append(tokens.tokens)
        self.writer.write_table(table, max_chunksize=1 << 16)
        self.hashes.append(hash_ids(table.column("id").to_pylist()))
        self.vectors.append(vectors)

    def abort(self) -> None:
        """Drop everything written so far (the target folder is untouched)."""
        for stream in (self.vectors, self.tokens, self.hashes):
            if stream is not None and not stream.stream.closed:
                stream.stream.close()
        if self.writer is not None:
            self.writer.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def finish(self) -> Path:
        """Build the faiss index, write the manifest, swap the folder in; the folder (open it with
        ``EmbeddingIndex.load``: this module does not import the index class, which builds through it)."""
        try:
            return self._finish()
        except BaseException:
            self.abort()
            raise

    def _finish(self) -> Path:
        from ..modeling.modeling_crossmetric import replace_directory
        from .assemble import assemble

        if self.count == 0:
            raise ValueError("no items were appended: an index needs at least one.")
        self.writer.close()
        self.hashes.close()
        if self.tokens is not None:
            self.tokens.close()
        if self.kind == "exact":
            self.vectors.close(flat_header(self.dim, self.count))  # type: ignore[arg-type]
        else:
            self.vectors.close()
        hashes = np.load(self.hashes.path, mmap_mode="r")
        lookup = build_lookup_from_hashes(np.asarray(hashes))
        _check_unique(lookup, self.staging / self.names["items"])
        np.save(self.staging / self.names["idhash"], lookup)
        del hashes
        os.unlink(self.hashes.path)
        meta = assemble(self, lookup)
        write_atomic(self.staging / METADATA_FILE, meta)
        replace_directory(self.staging, self.target)
        return self.target


def build_lookup_from_hashes(hashes: np.ndarray) -> np.ndarray:
    """2 × N: sorted hashes and the row of each (as :func:`.idhash.build_lookup`, from hashes already computed)."""
    order = np.argsort(hashes, kind="stable")
    return np.stack([hashes[order], order.astype(np.uint64)])


def _check_unique(lookup: np.ndarray, items: Path) -> None:
    """Refuse ids that appear twice across chunks (equal hashes are checked against the ids themselves)."""
    same = np.flatnonzero(lookup[0][1:] == lookup[0][:-1])
    if not len(same):
        return
    from .columns import read_table

    ids = read_table(items).column("id")
    for position in same.tolist():
        first, second = int(lookup[1][position]), int(lookup[1][position + 1])
        if ids[first].as_py() == ids[second].as_py():
            raise ValueError(f"ids must be unique; {ids[first].as_py()!r} appears in rows {first} and {second}.")


def from_shards(
    directory: str | os.PathLike, shards: Iterable[Mapping[str, Any]], *, kind: str = "exact", **options: Any
) -> Path:
    """The index folder built from ``shards`` (mappings with ``embeddings``, ``ids`` and optionally ``labels``,
    ``paths``, ``metadata``, ``head_tokens``) by an :class:`IndexBuilder`."""
    with IndexBuilder(directory, kind=kind, **options) as builder:
        for shard in shards:
            builder.append(
                shard["embeddings"], shard["ids"], shard.get("labels"), shard.get("paths"), shard.get("metadata"),
                head_tokens=shard.get("head_tokens"),
            )  # fmt: skip
        return builder.finish()
