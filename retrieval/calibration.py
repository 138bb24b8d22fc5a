"""Pick the search setting of an approximate faiss index (HNSW ``efSearch``, IVF ``nprobe``) on the data itself.

Why: the setting an approximate index needs for a given recall depends on the data far more than on its size.
Measured with ``scripts/benchmark_ann.py`` at 50k vectors of dimension 128: on clustered data HNSW reaches
recall@10 0.99 at ``efSearch=16``, on isotropic Gaussian data it needs ``efSearch=512`` (0.94 at 256), and IVF
needs 5% of its lists on the first but 75% on the second. A fixed default is either slow on easy data or wrong on
hard data, so the index measures instead: while it is built, a random sample of the vectors is held back, the
rest is added, the sample is searched exactly and approximately, and the setting is doubled until the sample's
recall@k reaches the target; then the sample is added too (with ids that keep every vector's row number).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import faiss
import numpy as np

logger = logging.getLogger(__name__)

HNSW_EF_SEARCH_STEPS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class Calibration:
    """The chosen setting and the recall it reached on the calibration sample."""

    parameter: str  # "ef_search" or "nprobe"
    value: int
    recall: float
    k: int
    queries: int
    target: float

    def to_dict(self) -> dict:
        return asdict(self)


def calibration_split(count: int, sample: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, held_out)`` row numbers: at most ``sample`` rows, and at most a tenth of the data, held out."""
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(count, size=min(sample, max(1, count // 10)), replace=False))
    return np.setdiff1d(np.arange(count), held), held


def search_steps(kind: str, index: faiss.Index) -> tuple[int, ...]:
    """The settings tried, smallest first: doubling ``efSearch``, or doubling ``nprobe`` up to all lists."""
    if kind == "hnsw":
        return HNSW_EF_SEARCH_STEPS
    nlist = index.nlist
    return tuple(sorted({min(nlist, 2**i) for i in range(int(np.ceil(np.log2(max(nlist, 1)))) + 1)}))


def set_search_param(index: faiss.Index, kind: str, value: int) -> None:
    """Set ``efSearch`` (HNSW, possibly inside an ``IndexIDMap2``) or ``nprobe`` (IVF) on ``index``."""
    if kind == "hnsw":
        inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
        inner.hnsw.efSearch = int(value)
    else:
        index.nprobe = int(value)


def calibrate(
    index: faiss.Index,
    indexed: np.ndarray,
    indexed_ids: np.ndarray,
    queries: np.ndarray,
    kind: str,
    *,
    target: float = 0.95,
    k: int = 10,
) -> Calibration:
    """Set and return the smallest step of ``efSearch`` / ``nprobe`` whose recall@k on ``queries`` >= ``target``.

    ``index`` holds exactly ``indexed`` (with ids ``indexed_ids``); ``queries`` are *not* in it. Held-out queries
    matter: a query already in an HNSW graph reaches itself and then its own neighbour list, which the build made,
    so its recall says nothing about search (measured: 0.98 held-in vs 0.60 held-out at ``efSearch=16`` on
    Gaussian data). The setting is left on ``index``. When no step reaches the target (HNSW at the largest
    step), the largest is kept and a warning says so; IVF always can (all lists = exhaustive search).
    """
    if not 0 < target <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target}.")
    k = min(k, len(indexed))
    exact = faiss.IndexFlatIP(indexed.shape[1])
    exact.add(indexed)
    _, positions = exact.search(queries, k)
    truth = [set(indexed_ids[row].tolist()) for row in positions]
    recall, value = 0.0, 0
    for value in search_steps(kind, index):
        set_search_param(index, kind, value)
        _, found = index.search(queries, k)
        recall = float(np.mean([len(set(f.tolist()) & t) / k for f, t in zip(found, truth)]))
        if recall >= target:
            break
    else:
        logger.warning(
            "%s index: recall@%d on held-out vectors is %.3f < %.3f even at %s=%d (the data has little "
            "neighbourhood structure); consider kind='exact'.",
            kind, k, recall, target, _name(kind), value,
        )  # fmt: skip
    return Calibration(_name(kind), int(value), round(recall, 4), k, len(queries), target)


def _name(kind: str) -> str:
    return "ef_search" if kind == "hnsw" else "nprobe"
