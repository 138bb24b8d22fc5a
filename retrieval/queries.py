"""The read side of :class:`~.index.EmbeddingIndex`: search (with removals and filters inside faiss), records,
re-ranking features, and the row views, over its segments (:mod:`.segments`).

Rows are numbered globally, segment after segment; ``search_arrays`` returns them. Everything per item is read from
the segments' (memory-mapped) files on demand: the Arrow columns for the hits of a search, the vectors and head
tokens of the candidates of a re-rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .columns import check_filter, filter_mask
from .head_tokens import HeadTokens
from .idhash import candidates, hash_ids
from .kinds import search_parameters, uses_global_ids
from .segments import Segment
from .selection import EXHAUSTIVE_BELOW, Selector, bits_of, exhaustive, merge_top_k, short_queries, unpack
from .vectors import normalise_rows


class IndexQueries:
    """What :class:`~.index.EmbeddingIndex` answers from its ``segments`` and ``removed`` bitmap, and the per-index
    state every constructor path sets (:meth:`_setup`; a builder fills one of these for the manifest)."""

    kind: str
    dim: int
    params: dict[str, Any]
    model: dict[str, Any]
    token_shape: list[int] | None
    token_stage: str | None
    segments: list[Segment]
    removed: np.ndarray  # packed bitmap over the global rows (1 = removed)

    def _setup(
        self,
        kind: str,
        dim: int,
        params: dict[str, Any],
        calibration: dict[str, Any] | None,
        model: dict[str, Any],
        token_info: tuple[list[int], str | None] | None,
    ) -> None:
        """The per-index state every constructor path sets (nothing per item)."""
        self.kind, self.dim, self.params, self.calibration, self.model = kind, dim, params, calibration, model
        self.token_shape, self.token_stage = (None, None) if token_info is None else token_info
        self.folder: Path | None = None
        self.generation = 0
        self.next_segment = 1
        self.trained: Any = None  # IVF kinds: the trained, empty faiss index new segments are encoded with
        self.bound_files: set[str] = set()  # the files the folder's current manifest names

    def _set_segments(self, segments: list[Segment], removed: np.ndarray) -> None:
        start = 0
        for segment in segments:
            segment.start = start
            start += segment.rows
        self.segments = segments
        self.removed = np.zeros((start + 7) // 8, np.uint8)
        self.removed[: min(len(removed), len(self.removed))] = removed[: len(self.removed)]
        self.removed_count = int(np.unpackbits(self.removed, bitorder="little")[:start].sum())
        self._starts = np.array([s.start for s in segments], dtype=np.int64)
        self._live_selectors: list[Selector | None] | None = None

    # -- counts --------------------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        """Stored rows, removed ones included (the next added row's number)."""
        return sum(s.rows for s in self.segments)

    def __len__(self) -> int:
        return self.rows - self.removed_count

    @property
    def schema(self) -> pa.Schema:
        return self.segments[0].table.schema

    # -- search --------------------------------------------------------------------------------------------------
    def search_arrays(
        self,
        query_embeddings: Any,
        k: int = 10,
        *,
        filter: Mapping[str, Sequence[Any]] | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
        refine: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw search: ``(scores, rows)``, both Q × min(k, live items passing ``filter``), best first; rows are global
        row numbers. Queries are L2-normalised first; removed rows and rows outside ``filter`` are skipped inside
        faiss. A query for which an approximate index found fewer than k is completed by exact scoring."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        queries = normalise_rows(query_embeddings, "query_embeddings")
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"query_embeddings have dimension {queries.shape[1]} but this index holds dimension {self.dim}: "
                "embed the queries with the model that built the index."
            )
        k = min(int(k), len(self))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        overrides = {"ef_search": ef_search, "nprobe": nprobe}
        refine = refine or self.params.get("refine")  # ivfpq: k × refine candidates re-scored exactly
        wanted = check_filter(filter)
        if wanted is None and self.removed_count == 0:
            params = search_parameters(self.kind, self.params, overrides, None)
            results = [s.search(queries, k, params, refine) for s in self.segments if s.rows]
            if len(results) == 1:
                scores, rows = results[0]
            else:
                scores, rows = merge_top_k([r[0] for r in results], [r[1] for r in results], k)
            short = short_queries(rows, k)
            if len(short):  # the probed lists (or the graph walk) held fewer than k items: complete those exactly
                scores[short], rows[short] = self._exhaustive(queries[short], self._allowed(None), k)
            return scores, rows
        # Tombstones alone: the live count is known and the selectors are cached (nothing per row per call).
        allowed = self._allowed(wanted) if wanted is not None else None
        passing = len(self) if allowed is None else sum(int(mask.sum()) for mask in allowed)
        k = min(k, passing)
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if self.kind != "exact" and passing <= EXHAUSTIVE_BELOW:
            return self._exhaustive(queries, allowed or self._allowed(None), k)
        selectors = self._selectors(allowed) if allowed is not None else self._live()
        results = []
        for segment, selector in zip(self.segments, selectors):
            if segment.rows and selector is not None:
                params = search_parameters(self.kind, self.params, overrides, selector.faiss)
                results.append(segment.search(queries, k, params, refine))
        scores, rows = merge_top_k([r[0] for r in results], [r[1] for r in results], k)
        short = short_queries(rows, k)
        if len(short):  # an approximate search that missed some passing rows: complete those queries exactly
            scores[short], rows[short] = self._exhaustive(queries[short], allowed or self._allowed(None), k)
        return scores, rows

    def _allowed(self, wanted: dict[str, list[Any]] | None) -> list[np.ndarray]:
        """Per segment, the bool mask of the rows a search may return (live, passing the filter)."""
        masks = []
        for segment in self.segments:
            mask = ~unpack(self.removed, segment.start, segment.start + segment.rows)
            if wanted is not None and segment.rows:
                mask &= filter_mask(segment.table, wanted)
            masks.append(mask)
        return masks

    def _selectors(self, allowed: list[np.ndarray]) -> list[Selector | None]:
        """faiss selectors per segment (None: nothing passes there); local bitmaps for ``exact``, else global."""
        selectors: list[Selector | None] = []
        global_bits = bits_of(np.concatenate(allowed)) if uses_global_ids(self.kind) else None
        for mask in allowed:
            if not mask.any():
                selectors.append(None)
            else:
                selectors.append(Selector(global_bits if global_bits is not None else bits_of(mask)))
        return selectors

    def _live(self) -> list[Selector | None]:
        """The selectors of the live rows (no filter), built once per change of the tombstones."""
        if self._live_selectors is None:
            self._live_selectors = self._selectors(self._allowed(None))
        return self._live_selectors

    def _exhaustive(self, queries: np.ndarray, allowed: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        parts = []
        for segment, mask in zip(self.segments, allowed):
            local = np.flatnonzero(mask)
            if len(local):
                parts.append((_Gather(segment.vectors, local), local + segment.start))
        return exhaustive(queries, parts, k)

    def search(
        self,
        query_embeddings: Any,
        k: int = 10,
        *,
        filter: Mapping[str, Sequence[Any]] | None = None,
        ef_search: int | None = None,
        nprobe: int | None = None,
        refine: int | None = None,
    ) -> list[list[dict[str, Any]]]:
        """For each query row, its ``k`` nearest live items that pass ``filter`` as ``{"id", "label", "score",
        "path"}``, best first.

        ``score`` is the inner product of the normalised vectors (cosine similarity). A single 1-D query still
        gives a list with one result list. ``filter``: ``{column: [allowed values]}`` (OR within a column, AND
        across), applied inside faiss. ``ef_search`` / ``nprobe`` / ``refine`` override the HNSW / IVF / IVF-PQ
        settings for this call.
        """
        options = {"ef_search": ef_search, "nprobe": nprobe, "refine": refine}
        scores, rows = self.search_arrays(query_embeddings, k, filter=filter, **options)
        found = self._row_records(rows.ravel(), ("id", "label", "path"))
        results, position = [], 0
        for score_row, row_row in zip(scores.tolist(), rows.tolist()):
            hits = []
            for score, row in zip(score_row, row_row):
                if row >= 0:
                    record = found[position]
                    hits.append({"id": record["id"], "label": record["label"], "score": float(score),
                                 "path": record["path"]})  # fmt: skip
                position += 1
            results.append(hits)
        return results

    # -- per-item reads --------------------------------------------------------------------------------------------
    def _segment_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._starts, rows, side="right") - 1

    def _row_records(self, rows: np.ndarray, columns: Sequence[str] | None = None) -> list[dict[str, Any] | None]:
        """The column values of each global row (None for -1), read from the Arrow tables of their segments."""
        out: list[dict[str, Any] | None] = [None] * len(rows)
        rows = np.asarray(rows, dtype=np.int64)
        valid = np.flatnonzero(rows >= 0)
        which = self._segment_of(rows[valid])
        for index in np.unique(which):
            segment = self.segments[index]
            picks = valid[which == index]
            records = segment.take(rows[picks] - segment.start, None if columns is None else list(columns))
            for position, record in zip(picks.tolist(), records):
                out[position] = record
        return out

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """The live row of each id (-1 for an id not in the index or removed), via the segments' hash lookups."""
        ids = [str(i) for i in ids]
        out = np.full(len(ids), -1, dtype=np.int64)
        if not ids:
            return out
        hashes = hash_ids(ids)
        for segment in self.segments:
            if not segment.rows:
                continue
            which, local = candidates(segment.lookup, hashes)
            if not len(which):
                continue
            rows = local + segment.start
            alive = ((self.removed[rows >> 3] >> (rows & 7)) & 1) == 0
            found = [record["id"] for record in segment.take(local, ["id"])]
            for w, row, name, live in zip(which.tolist(), rows.tolist(), found, alive.tolist()):
                if live and name == ids[w]:
                    out[w] = row
        return out

    def records(self, ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """``{"id", "label", "path", **metadata}`` of each id (None for an id not in the index)."""
        return self._row_records(self.rows_of(ids))

    def _known_rows(self, ids: Sequence[str]) -> np.ndarray:
        rows = self.rows_of(ids)
        if (rows < 0).any():
            missing = [ids[i] for i in np.flatnonzero(rows < 0)[:3]]
            raise KeyError(f"ids not in the index (or removed): {missing}")
        return rows

    def vectors_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """float32 embeddings of global ``rows`` (read from the memory-mapped segments)."""
        out = np.empty((len(rows), self.dim), np.float32)
        which = self._segment_of(rows)
        for index in np.unique(which):
            picks = np.flatnonzero(which == index)
            segment = self.segments[index]
            out[picks] = segment.vectors[rows[picks] - segment.start]
        return out

    def rerank_features(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(embeddings N×D float32, head tokens N×T×C float16)`` of ``ids``, in that order; only these rows are
        read from the memory-mapped files."""
        if self.token_shape is None:
            raise ValueError("the index holds no head tokens to re-rank with: rebuild it with a re-ranker's model.")
        rows = self._known_rows(ids)
        tokens = np.empty((len(rows), *self.token_shape), np.float16)
        which = self._segment_of(rows)
        for index in np.unique(which):
            picks = np.flatnonzero(which == index)
            segment = self.segments[index]
            tokens[picks] = segment.tokens[rows[picks] - segment.start]  # type: ignore[index]
        return self.vectors_of_rows(rows), tokens

    def head_tokens_info(self) -> dict[str, Any] | None:
        """``{"shape": [T, C], "token_stage", "dtype", "bytes_per_item"}`` of the stored tokens, or None."""
        if self.token_shape is None:
            return None
        size = int(np.prod(self.token_shape)) * 2
        return {"shape": list(self.token_shape), "dtype": "float16", "token_stage": self.token_stage,
                "bytes_per_item": size}  # fmt: skip

    def near_duplicates(self, threshold: float = 0.95, *, progress: bool = False) -> list[list[str]]:
        """Groups of ids whose embeddings are near copies (see :func:`.duplicates.near_duplicates`)."""
        from .duplicates import near_duplicates

        return near_duplicates(self, threshold, progress=progress)

    # -- row views (inspection and tests; the search path never builds them) --------------------------------------
    def _column(self, name: str) -> list[Any]:
        return [value for s in self.segments for value in s.table.column(name).to_pylist()]

    @property
    def ids(self) -> list[str]:
        """The id of every stored row, indexed by the rows :meth:`search_arrays` returns (a list built on demand)."""
        return self._column("id")

    @property
    def labels(self) -> list[str | None] | None:
        values = self._column("label")
        return None if all(v is None for v in values) else values

    @property
    def paths(self) -> list[str | None] | None:
        values = self._column("path")
        return None if all(v is None for v in values) else values

    @property
    def embeddings(self) -> np.ndarray:
        """Every stored row's embedding (float32); a view of the memory-mapped file when there is one segment."""
        parts = [s.vectors for s in self.segments]
        if len(parts) == 1 and parts[0].dtype == np.float32:
            return parts[0]
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])

    @property
    def head_tokens(self) -> HeadTokens | None:
        """Every stored row's head tokens (memory-mapped when there is one segment), or None."""
        if self.token_shape is None:
            return None
        parts = [s.tokens for s in self.segments]
        tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)  # type: ignore[arg-type]
        return HeadTokens(tokens, self.token_stage)  # type: ignore[arg-type]

    @property
    def faiss_index(self) -> Any:
        """The faiss index of the first segment (the whole index until something is added)."""
        return self.segments[0].index


class _Gather:
    """Rows ``local`` of a (memory-mapped) array, sliced lazily block by block (only those rows are read)."""

    def __init__(self, array: np.ndarray, local: np.ndarray) -> None:
        self.array, self.local = array, local

    def __getitem__(self, block: slice) -> np.ndarray:
        return np.asarray(self.array[self.local[block]], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.local)
