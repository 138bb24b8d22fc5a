"""Exact inner-product k-nearest-neighbour search for retrieval metrics, in bounded memory.

Why a module of its own: the retrieval metrics need, for every query, its nearest gallery items in a
*canonical* order (higher score first, exact ties broken by the lower gallery index), with the query's
own row removed *by index* in the leave-one-out protocol. Neither faiss nor ``torch.topk`` promise an
order among tied scores, so two backends (or two runs) could disagree on data with exact duplicates;
this module makes the result a function of the scores alone.

Two backends, same result:

- faiss (``faiss.knn`` with ``METRIC_INNER_PRODUCT``: the same exhaustive kernel that
  ``IndexFlatIP.search`` runs, without copying the gallery into an index, which would double its memory);
- torch: a chunked matrix product followed by a tie-aware top-k (used when faiss is missing or
  ``use_faiss=False``).

Queries are processed in chunks sorted by how many neighbours each needs (``need``), so one very large
class does not force a large k, and its memory, onto every query. The N×N score matrix never exists.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

# Bytes that one chunk of queries may hold in scores, indices and masks. 256 MiB keeps a 120k-item
# evaluation far below a 4 GiB budget while leaving chunks large enough for BLAS to run at full speed.
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def faiss_available() -> bool:
    """Return whether ``faiss`` can be imported (without importing it)."""
    return importlib.util.find_spec("faiss") is not None


def resolve_use_faiss(use_faiss: bool | None) -> bool:
    """Turn the user's ``use_faiss`` (``None`` = when installed) into a decision, failing clearly."""
    if use_faiss is None:
        return faiss_available()
    if use_faiss and not faiss_available():
        raise ImportError(
            "use_faiss=True but faiss is not installed: `pip install faiss-cpu`, or pass use_faiss=False."
        )
    return bool(use_faiss)


def canonical_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores per row, ordered by (score descending, index ascending).

    ``torch.topk`` picks an arbitrary subset of the items tied with the k-th score; rows where such a tie
    crosses the k boundary are redone so that the lowest indices among the tied items are kept.
    """
    values, indices = torch.topk(scores, k, dim=1, largest=True, sorted=True)
    threshold = values[:, -1:]
    crossing = ((scores >= threshold).sum(dim=1) > k).nonzero().flatten()
    if len(crossing) > 0:
        rows, row_threshold = scores[crossing], threshold[crossing]
        above = rows > row_threshold
        tied = rows == row_threshold
        wanted = k - above.sum(dim=1, keepdim=True)
        keep = above | (tied & (tied.cumsum(dim=1) <= wanted))
        # Exactly k True per row; nonzero lists them row by row, in ascending index order.
        kept = keep.nonzero()[:, 1].view(len(crossing), k)
        indices[crossing] = kept
        values[crossing] = torch.gather(rows, 1, kept)
    return _sort_canonically(values, indices)


def _sort_canonically(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Reorder each row by (value descending, index ascending): sort by index, then stable by value."""
    by_index = torch.argsort(indices, dim=1)
    indices, values = torch.gather(indices, 1, by_index), torch.gather(values, 1, by_index)
    by_value = torch.sort(values, dim=1, descending=True, stable=True).indices
    return torch.gather(indices, 1, by_value)


def _torch_chunk(queries: np.ndarray, gallery: torch.Tensor, k: int, self_ids: np.ndarray | None) -> np.ndarray:
    """Exact canonical top-k of one query chunk by a dense matrix product; self excluded by index."""
    scores = torch.from_numpy(queries) @ gallery.T
    if self_ids is not None:
        scores[torch.arange(len(queries)), torch.from_numpy(self_ids)] = -torch.inf
    return canonical_topk(scores, k).numpy()


def _faiss_chunk(
    queries: np.ndarray,
    gallery: np.ndarray,
    gallery_t: torch.Tensor,
    k: int,
    self_ids: np.ndarray | None,
    redo_rows: int,
) -> np.ndarray:
    """Canonical top-k of one query chunk through faiss, exact under ties (see module docstring).

    faiss is asked for k neighbours, +1 for the query itself (leave-one-out), +1 sentinel. After sorting
    the candidates canonically and dropping the query's own index (or, when faiss did not return it, the
    last candidate), a row is exact when the sentinel scores strictly below the k-th neighbour: nothing
    outside the candidates can then tie with the kept ones. Rows where it does not are recomputed with
    the torch kernel, which sees the whole gallery row, ``redo_rows`` at a time.
    """
    import faiss  # optional dependency; imported here so that the torch path works without it

    n_gallery = len(gallery)
    extra = 1 if self_ids is not None else 0
    k_search = min(n_gallery, k + extra + 1)
    distances, indices = faiss.knn(queries, gallery, k_search, metric=faiss.METRIC_INNER_PRODUCT)
    order = np.lexsort((indices, -distances), axis=1)
    indices = np.take_along_axis(indices, order, axis=1)
    distances = np.take_along_axis(distances, order, axis=1)
    if self_ids is not None:
        is_self = indices == self_ids[:, None]
        # Rows whose own index was not returned drop their last candidate instead (it ranks lowest).
        is_self[~is_self.any(axis=1), -1] = True
        keep = ~is_self
        indices = indices[keep].reshape(len(queries), k_search - 1)
        distances = distances[keep].reshape(len(queries), k_search - 1)
    if indices.shape[1] > k:  # a sentinel column exists: check that no tie crosses the boundary
        ambiguous = np.flatnonzero(distances[:, k] >= distances[:, k - 1])
        for start in range(0, len(ambiguous), redo_rows):
            rows = ambiguous[start : start + redo_rows]
            redo_self = self_ids[rows] if self_ids is not None else None
            indices[rows, :k] = _torch_chunk(queries[rows], gallery_t, k, redo_self)
    return indices[:, :k]


def iter_knn(
    queries: np.ndarray,
    gallery: np.ndarray,
    need: np.ndarray,
    *,
    subset: np.ndarray | None = None,
    self_ids: np.ndarray | None = None,
    use_faiss: bool | None = None,
    batch_size: int = 4096,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    progress: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(query_rows, neighbours)`` chunk by chunk for the exact inner-product kNN of every query.

    Args:
        queries: (Q, D) float32, C-contiguous.
        gallery: (N, D) float32, C-contiguous.
        need: how many neighbours each searched query needs (1 <= need <= N, or N - 1 with ``self_ids``).
        subset: rows of ``queries`` to search (default: all); indexing per chunk avoids copying them.
        self_ids: for leave-one-out, the gallery index of each searched query, excluded from its neighbours.
        use_faiss: faiss backend when True, torch when False, faiss if installed when None.
        batch_size: most queries per chunk (fewer when the memory budget asks for it).
        memory_budget: bytes a chunk may use for scores, candidates and masks.
        progress: show a tqdm bar over queries.

    Yields:
        ``query_rows`` (C,) positions among the searched queries (``subset`` order) and ``neighbours``
        (C, k) gallery indices in
        canonical order, where ``k = need[query_rows].max()``; every row holds at least its own ``need``.
    """
    faiss_backend = resolve_use_faiss(use_faiss)
    n_queries, n_gallery = (len(queries) if subset is None else len(subset)), len(gallery)
    available = n_gallery - (1 if self_ids is not None else 0)
    if len(need) != n_queries or (n_queries > 0 and not 1 <= int(need.min()) <= int(need.max()) <= available):
        raise ValueError(f"need must hold one value in [1, {available}] per query; got {need!r}.")
    gallery_t = torch.from_numpy(gallery)
    order = np.argsort(need, kind="stable")
    # Torch holds per query a float32 score row, bool masks and an int64 running count of ties in
    # canonical_topk (<= 16 bytes per gallery item); faiss holds only its candidates (values, int64 ids,
    # sorted copies); ambiguous faiss rows are redone by the torch kernel within the same budget.
    dense_row_bytes = 16 * n_gallery
    redo_rows = max(1, memory_budget // dense_row_bytes)
    with tqdm(total=n_queries, desc="nearest neighbours", unit="query", disable=not progress) as bar:
        start = 0
        while start < n_queries:
            rows = min(batch_size, n_queries - start)
            while True:
                k = int(need[order[start + rows - 1]])
                # ~48 bytes per candidate: faiss' values and ids, sorted copies, and the caller's per-neighbour
                # match / running-precision arrays.
                row_bytes = 48 * (k + 2) + (0 if faiss_backend else dense_row_bytes)
                if rows == 1 or rows * row_bytes <= memory_budget:
                    break
                rows //= 2
            query_rows = order[start : start + rows]
            chunk = queries[query_rows if subset is None else subset[query_rows]]
            chunk_self = self_ids[query_rows] if self_ids is not None else None
            if faiss_backend:
                neighbours = _faiss_chunk(chunk, gallery, gallery_t, k, chunk_self, redo_rows)
            else:
                neighbours = _torch_chunk(chunk, gallery_t, k, chunk_self)
            yield query_rows, neighbours
            bar.update(rows)
            start += rows
