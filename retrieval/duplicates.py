"""Near duplicates in an index: groups of live items whose embeddings have cosine similarity >= a threshold.

Every live vector is asked, block by block, for the items within the threshold with faiss' range search on the
index's own segments (``range_search``: exhaustive on ``exact``, through the graph or the probed lists on the
approximate kinds, with removed rows excluded by the same id selector a search uses). ``ivfpq`` compares compressed
codes, whose scores can be too far off for a range (measured: copies at cosine 0.9999 missed at threshold 0.98), so
it asks each item's :data:`PQ_NEIGHBOURS` nearest instead, re-scored exactly (larger groups still join through
their members' neighbours). Candidate pairs are checked
against the stored vectors (exact cosine; the approximate kinds' scores can be off), and the groups are the connected
components of the pairs (``scipy.sparse.csgraph``): copies of copies end in one group. This is what a team runs on
a new gallery first, and how copies of one image are kept out of both a training set and a test set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .faiss_numpy import numpy_method
from .kinds import search_parameters, uses_global_ids
from .selection import unpack

_BLOCK = 4096
PQ_NEIGHBOURS = 64


def near_duplicates(index: Any, threshold: float = 0.95, *, progress: bool = False) -> list[list[str]]:
    """Groups (each at least two ids, sorted by row) of live items with cosine >= ``threshold`` to another member;
    groups ordered by their first row."""
    if not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold is a cosine similarity between -1 and 1, got {threshold!r}.")
    refine = index.params.get("refine")
    allowed = index._allowed(None)
    selectors = index._live() if index.removed_count else [None] * len(index.segments)
    firsts, seconds = [], []
    bar = tqdm(total=len(index), desc="near duplicates", unit="item", disable=not progress)
    for segment, mask in zip(index.segments, allowed):
        live = np.flatnonzero(mask)
        for start in range(0, len(live), _BLOCK):
            local = live[start : start + _BLOCK]
            queries = np.asarray(segment.vectors[local], dtype=np.float32)
            rows = local + segment.start
            for other, selector in zip(index.segments, selectors):
                if not other.rows or (index.removed_count and selector is None):
                    continue
                params = search_parameters(index.kind, index.params, {}, selector.faiss if selector else None)
                if index.kind == "ivfpq":  # compressed codes: the refined k-NN instead (exact scores, see above)
                    scores, found = other.search(queries, min(PQ_NEIGHBOURS, other.rows), params, refine)
                    query_of = np.broadcast_to(rows[:, None], found.shape)[scores >= threshold]
                    found = found[scores >= threshold]
                else:
                    range_search = numpy_method(other.index, "range_search")
                    limits, _, found = range_search(queries, float(threshold), params=params)
                    if not uses_global_ids(index.kind):
                        found = found + other.start
                    query_of = np.repeat(rows, np.diff(limits).astype(np.int64))
                keep = query_of < found  # each pair once, no self pairs
                firsts.append(query_of[keep])
                seconds.append(found[keep])
            bar.update(len(local))
    bar.close()
    if not firsts:
        return []
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    if len(first):
        exact = np.einsum("nd,nd->n", index.vectors_of_rows(first), index.vectors_of_rows(second))
        first, second = first[exact >= threshold - 1e-6], second[exact >= threshold - 1e-6]
    if index.removed_count and len(first):  # an approximate range search without a selector path: drop removed rows
        alive = ~unpack(index.removed, 0, index.rows)
        keep = alive[first] & alive[second]
        first, second = first[keep], second[keep]
    return _groups(index, first, second)


def _groups(index: Any, first: np.ndarray, second: np.ndarray) -> list[list[str]]:
    """Connected components of the pairs, as lists of ids."""
    if not len(first):
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes, inverse = np.unique(np.concatenate([first, second]), return_inverse=True)
    size = len(nodes)
    graph = coo_matrix((np.ones(len(first)), (inverse[: len(first)], inverse[len(first) :])), shape=(size, size))
    _, component = connected_components(graph, directed=False)
    records = index._row_records(nodes, ["id"])
    groups: dict[int, list[str]] = {}
    for node, label in enumerate(component.tolist()):  # nodes are sorted by row: groups come out in row order
        groups.setdefault(label, []).append(records[node]["id"])
    return list(groups.values())
