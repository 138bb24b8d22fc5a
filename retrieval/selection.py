"""Which rows a search may return (not removed, passing the filter), handed to faiss as an id selector.

Removed rows (tombstones) and filters are applied inside faiss' search (``IDSelectorBitmap`` in the search
parameters), not to its top k afterwards: faiss then skips the rows that may not be returned, so ``k`` results come
back however few rows pass. The bitmap is packed (one bit per row, little-endian bit order as faiss reads it) and
built per call from the memory-mapped Arrow columns (``pyarrow.compute``) and the tombstones.

When few rows pass (at most :data:`EXHAUSTIVE_BELOW`), an approximate index would have to visit most of its graph or
lists to find them; they are then scored exhaustively instead (their vectors gathered from the memory-mapped
files), which is exact and faster. Likewise a query for which an approximate search with a selector found fewer
than ``k`` of the rows that pass is completed exhaustively, so the ``k`` results the filter allows always come back.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

EXHAUSTIVE_BELOW = 32768
_BLOCK = 1 << 15


def bits_of(mask: np.ndarray) -> np.ndarray:
    """Pack a bool mask into the bitmap faiss' ``IDSelectorBitmap`` reads (bit ``i`` of byte ``i // 8``)."""
    return np.packbits(mask, bitorder="little")


def unpack(bits: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Bool mask of rows ``start`` .. ``stop - 1`` of a packed bitmap (rows past its end are False)."""
    first, last = start // 8, (stop + 7) // 8
    chunk = np.unpackbits(bits[first:last], bitorder="little").astype(bool)
    offset = start - first * 8
    out = np.zeros(stop - start, dtype=bool)
    part = chunk[offset : offset + stop - start]
    out[: len(part)] = part
    return out


def set_bits(bits: np.ndarray, rows: np.ndarray, total: int) -> np.ndarray:
    """A new bitmap covering ``total`` rows: ``bits`` with ``rows`` set."""
    out = np.zeros((total + 7) // 8, dtype=np.uint8)
    out[: min(len(bits), len(out))] = bits[: len(out)]
    rows = np.asarray(rows, dtype=np.int64)
    np.bitwise_or.at(out, rows >> 3, (1 << (rows & 7)).astype(np.uint8))
    return out


class Selector:
    """A faiss ``IDSelectorBitmap`` over a packed bitmap it keeps alive (faiss holds a bare pointer to it)."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = np.ascontiguousarray(bits, dtype=np.uint8)
        self.faiss = faiss.IDSelectorBitmap(len(self.bits), faiss.swig_ptr(self.bits))


def exhaustive(
    queries: np.ndarray, parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` over the rows ``parts`` lists (``(vectors, global rows)`` each), scored in blocks.

    Returns ``(scores, rows)``, Q × k, -1 / -inf where fewer rows exist. Vectors may be float16 (``ivfpq``): they are
    scored in float32.
    """
    best_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), k), -1, dtype=np.int64)
    for vectors, rows in parts:
        for start in range(0, len(rows), _BLOCK):
            block = np.asarray(vectors[start : start + _BLOCK], dtype=np.float32)
            scores = queries @ block.T
            candidates = np.broadcast_to(rows[start : start + _BLOCK], scores.shape)
            best_scores, best_rows = merge_top_k([best_scores, scores], [best_rows, candidates], k)
    return best_scores, best_rows


def merge_top_k(scores: Sequence[np.ndarray], rows: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` per query of several ``(scores, rows)`` result blocks (rows -1 = no result), best first."""
    all_scores = np.concatenate([np.where(r >= 0, s, -np.inf) for s, r in zip(scores, rows)], axis=1)
    all_rows = np.concatenate(rows, axis=1)
    if all_scores.shape[1] > k:
        part = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
        all_scores = np.take_along_axis(all_scores, part, axis=1)
        all_rows = np.take_along_axis(all_rows, part, axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")
    top_scores = np.take_along_axis(all_scores, order, axis=1).astype(np.float32)
    top_rows = np.take_along_axis(all_rows, order, axis=1)
    if top_scores.shape[1] < k:
        pad = k - top_scores.shape[1]
        top_scores = np.pad(top_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_rows = np.pad(top_rows, ((0, 0), (0, pad)), constant_values=-1)
    top_rows = np.where(np.isfinite(top_scores), top_rows, -1)
    return top_scores, top_rows


def short_queries(rows: np.ndarray, wanted: int) -> np.ndarray:
    """Indices of the queries with fewer than ``wanted`` results."""
    return np.flatnonzero((rows >= 0).sum(axis=1) < wanted)
