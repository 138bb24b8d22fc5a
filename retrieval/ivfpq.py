"""The compressed on-disk faiss index behind ``kind="ivfpq"``: sizing rule, training, on-disk lists, re-scoring.

An IVF-PQ index keeps, per item, only a product-quantised code and an 8-byte id in its inverted lists. Here those
lists live in a file beside the index (``stem.ivfdata``, faiss ``OnDiskInvertedLists``) that is memory-mapped when
the index is read (:func:`read_ondisk`, ``faiss.IO_FLAG_ONDISK_SAME_DIR``): the process's heap holds the centroids,
the PQ codebooks, the optional OPQ rotation and one offset record per list, nothing per item. The pages of the lists
belong to the page cache and are shared between processes. This is how clip-retrieval serves 5.8e9 CLIP embeddings
in about 16 GB (``clip_back_prepro/index_combiner.py``) and how faiss' ``demos/demo_ondisk_ivf.py`` builds them.

The steps, in the order a build calls them:

1. :func:`ivfpq_layout` picks ``nlist`` and the code size from the item count and a memory budget (the rule is in
   its docstring; it follows autofaiss' ``get_optimal_index_keys_v2`` / ``get_optimal_quantization``).
2. :func:`train_ivf` trains an empty index on a sample (:func:`training_sample_size` says how large). Above
   ``TWO_LEVEL_MIN_NLIST`` lists the coarse centroids come from faiss' two-level k-means
   (``faiss.contrib.clustering.two_level_clustering``): sqrt(nlist) clusters, then each split again, which costs
   about sqrt(nlist) times less than one k-means with nlist centroids.
3. :func:`write_ondisk` encodes the vectors chunk by chunk into in-memory shards of at most ``shard_items`` codes,
   writes each shard to a temporary file, and merges the shards' lists into ``stem.ivfdata`` with faiss' own
   ``faiss.contrib.ondisk.merge_ondisk`` (shards read with ``IO_FLAG_MMAP``, the merged file written through a
   memory map). The faiss ids are the int64 global row numbers given with each chunk. From
   4,096 lists on, vectors are assigned to lists through groups of centroids (:mod:`.ivfpq_assign`) instead of
   being compared with all of them.
4. :func:`search_refined` asks the index for ``k × refine`` candidates and re-scores them exactly against the
   float16 embeddings (memory-mapped by the caller), so the scores returned are exact dot products.

Limits of faiss' on-disk lists, and why an on-disk index is written once and never changed here:

- Adding to a merged on-disk index is "supported but so inefficient that it is not practically usable"
  (faiss#2876, faiss#1258: "Adding to an on-disk index is not supported"); ``add_with_ids``, ``merge_from`` and
  ``merge_into`` on an index with an ``.ivfdata`` file can leave it inconsistent (faiss#3498).
- ``remove_ids`` on an index read with ``IO_FLAG_ONDISK_SAME_DIR`` is reported to remove nothing and return 0
  (faiss#2315).
- ``merge_ondisk`` refuses the block-packed lists of the 4-bit fast-scan IVF-PQ (``PQ16x4fs``: "code_size"
  assertion, tried with faiss 1.15), so the on-disk kind scans 8-bit codes without SIMD tables.
- ``merge_from_multiple`` only concatenates lists; faiss' ``shift_ids`` renumbers per shard, which we do not need
  because every shard already carries global row numbers.

So a changeable index (``retrieval/index.py``) writes one on-disk index per segment (the rows added together) and
removes items with tombstones passed to the search as an ``IDSelector``; a compaction writes a new segment.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.clustering import two_level_clustering
from faiss.contrib.ondisk import merge_ondisk
from tqdm.auto import tqdm

from .faiss_numpy import numpy_method
from .ivfpq_assign import GroupAssigner, group_assigner
from .storage import without_prefetch_threads

logger = logging.getLogger(__name__)

# k × DEFAULT_REFINE candidates are re-scored exactly. Measured (scripts/benchmark_results/index_scale/results.md,
# clustered vectors, d = 128): at 10^6 (IVF4096,PQ32x8) recall@10 stops rising with nprobe at 0.924 / 0.978 / 0.988
# for refine 5 / 10 / 20; at 10^7 (IVF16384,PQ32x8) refine 10 stays at 0.925 up to nprobe 128 while refine 20
# reaches 0.952 at nprobe 64 (3.2 ms per query in batches of 64) and refine 40 0.954 at nprobe 32 (3.9 ms).
# 20 is the smallest that reaches 0.95 at both sizes.
DEFAULT_REFINE = 20

# PQ sizes tried, largest first (autofaiss' list above 4 bytes, without those ≥ the dimension).
PQ_SIZES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
ID_BYTES = 8  # faiss stores an int64 id beside each code in the inverted lists
FULL_CODE_MIN_ITEMS = 10_000  # 8-bit codes (256 centroids per sub-quantiser) need ~39 × 256 training points
MIN_ITEMS = 16  # 4-bit codes need 16 training points per sub-quantiser
MIN_POINTS_PER_LIST = 39  # faiss warns below 39 training points per centroid
TRAIN_POINTS_PER_LIST = 64  # sample size for the coarse k-means, per list
PQ_TRAIN_POINTS = 2**14  # codebook training rows: 64 per centroid of an 8-bit sub-quantiser (faiss' minimum is 39)
PQ_TRAIN_NITER = 10  # k-means iterations per sub-quantiser (faiss' default 25): 4-d sub-spaces converge quickly
TWO_LEVEL_MIN_NLIST = 1024
MAX_NLIST = 2**18
DEFAULT_SHARD_ITEMS = 2**20  # codes held in memory before a shard is written out (2^20 × 72 B ≈ 75 MB at PQ64)

_MEMORY_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@dataclass(frozen=True)
class IVFPQLayout:
    """What :func:`ivfpq_layout` chose: ``nlist`` lists, PQ with ``code_size`` sub-quantisers of ``nbits`` bits,
    an OPQ rotation or not, and the faiss ``index_factory`` string that builds it."""

    nlist: int
    code_size: int  # PQ m: sub-quantisers per vector (bytes per code when nbits == 8)
    opq: bool
    factory: str
    nbits: int = 8

    @property
    def code_bytes(self) -> int:
        """Bytes of one PQ code in the inverted lists (without its 8-byte id)."""
        return math.ceil(self.code_size * self.nbits / 8)

    def list_bytes(self, count: int) -> int:
        """Bytes of the inverted lists (codes and ids) for ``count`` items: the ``.ivfdata`` file's size."""
        return count * (self.code_bytes + ID_BYTES)

    def fixed_bytes(self, dim: int) -> int:
        """Bytes held in RAM whatever the count: centroids, PQ codebooks, the OPQ matrix, per-list offsets."""
        codebooks = self.code_size * (2**self.nbits) * math.ceil(dim / self.code_size) * 4
        rotation = dim * dim * 4 if self.opq else 0
        return self.nlist * dim * 4 + codebooks + rotation + self.nlist * 24  # OnDiskInvertedLists.List: 3 × 8 B


def parse_memory(text: str | int) -> int:
    """Bytes in a memory size such as ``"2G"``, ``"512M"``, ``"1.5GB"``, ``"64KiB"`` or ``1000000``.

    Units are powers of 1024 (as autofaiss' ``cast_memory_to_bytes``): K, M, G, T, with an optional ``B`` or ``iB``.
    """
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", str(text).upper())
        if match is None:
            raise ValueError(
                f"max_memory {text!r} is not a memory size: write a number with an optional unit K, M, G or T "
                "(powers of 1024), e.g. '2G' or '512M'."
            )
        value = float(match.group(1)) * _MEMORY_UNITS[match.group(2)]
    if value < 1:
        raise ValueError(f"max_memory {text!r} must be at least one byte, e.g. '2G'.")
    return int(value)


def _nlist(count: int) -> int:
    """4·sqrt(N) rounded to a power of two, at least 39 training points per list, at most 2^18 lists."""
    target = 2 ** round(math.log2(4 * math.sqrt(count)))
    return int(max(1, min(target, count // MIN_POINTS_PER_LIST, MAX_NLIST)))


def ivfpq_layout(count: int, dim: int, max_memory: int | str) -> IVFPQLayout:
    """The IVF-PQ index for ``count`` vectors of ``dim`` dimensions within ``max_memory`` bytes.

    The rule (autofaiss' ``get_optimal_index_keys_v2`` for a memory-mappable index, with the list count that faiss'
    guidelines give and autofaiss' ``get_optimal_nb_clusters`` approximates by steps):

    - ``nlist`` = 4·sqrt(count) rounded to the nearest power of two (faiss' wiki: 4·sqrt(N) to 16·sqrt(N) lists),
      at most count / 39 (faiss' minimum of training points per list) and at most 2^18; so 4,096 lists at 10^6,
      16,384 at 10^7, 131,072 at 10^9.
    - The PQ size ``m`` (bytes per code at 8 bits) is the largest of 256, 128, 64, 48, 32, 24, 16, 8, 4 that is at
      most ``dim / 4`` (at least four dimensions per sub-quantiser; autofaiss allows up to ``dim / 2``: since the
      top ``k × refine`` candidates are re-scored exactly, the codes only have to rank candidates, and 4-d
      sub-quantisers train in half the time and take half the memory of 2-d ones) and for which
      the lists and the fixed part fit the budget: ``count × (m + 8) + fixed ≤ max_memory``, where 8 is the int64
      id faiss keeps beside each code and ``fixed`` is the centroids (``nlist × dim × 4``), codebooks, OPQ matrix
      and list offsets. The lists are memory-mapped, so the budget is what the index takes when its file is fully
      in the page cache; the heap holds only the fixed part. With 10^7 × 128 and 2 GiB: m = 32 (400 MB of lists).
    - Codes have 8 bits, or 4 bits below 10,000 items (8-bit codebooks need about 39 × 256 training points).
    - OPQ (a learned rotation before PQ) is used when each sub-quantiser covers 8 dimensions or more, where it
      helps most (Ge et al. 2013; autofaiss always uses it), or when ``m`` does not divide ``dim`` (the rotation
      then maps to the next multiple of ``m``).

    Raises ``ValueError`` when the count is below 16 (use ``exact``) or when even 4-byte codes do not fit
    ``max_memory`` (the message gives the smallest budget that does).
    """
    count, dim = int(count), int(dim)
    budget = parse_memory(max_memory)
    if dim < 2:
        raise ValueError(f"ivfpq needs vectors of at least 2 dimensions, got dim={dim}.")
    if count < MIN_ITEMS:
        raise ValueError(f"ivfpq needs at least {MIN_ITEMS} items to train its quantisers, got {count}: use exact.")
    nlist = _nlist(count)
    nbits = 8 if count >= FULL_CODE_MIN_ITEMS else 4
    candidates = [m for m in PQ_SIZES if m <= dim // 4] or [1]
    layout = None
    for m in candidates:
        layout = _layout(nlist, m, nbits, dim)
        if layout.list_bytes(count) + layout.fixed_bytes(dim) <= budget:
            return layout
    needed = layout.list_bytes(count) + layout.fixed_bytes(dim)
    raise ValueError(
        f"max_memory={budget:,} bytes cannot hold {count:,} items even at {layout.code_bytes}-byte codes: "
        f"they need {needed:,} bytes ({needed / 1024**3:.2f} GiB); pass a larger --max_memory."
    )


def _layout(nlist: int, m: int, nbits: int, dim: int) -> IVFPQLayout:
    opq = dim % m != 0 or dim // m >= 8
    rotation = f"OPQ{m}_{m * math.ceil(dim / m)}," if opq else ""
    return IVFPQLayout(nlist, m, opq, f"{rotation}IVF{nlist},PQ{m}x{nbits}", nbits)


def training_sample_size(layout: IVFPQLayout | str, count: int) -> int:
    """How many vectors :func:`train_ivf` should get: 64 per list (at least 256 × 256 for the codebooks), at most
    ``count``. 1,048,576 at 16,384 lists (512 MB of float32 at d = 128, held only while training)."""
    nlist = layout.nlist if isinstance(layout, IVFPQLayout) else _factory_nlist(layout)
    return int(min(count, max(TRAIN_POINTS_PER_LIST * nlist, PQ_TRAIN_POINTS)))


def _factory_nlist(factory: str) -> int:
    match = re.search(r"IVF(\d+)", factory)
    if match is None:
        raise ValueError(f"factory {factory!r} is not an IVF index: it must contain 'IVF<nlist>'.")
    return int(match.group(1))


def train_ivf(
    sample: np.ndarray,
    layout_or_factory: IVFPQLayout | str,
    metric: int = faiss.METRIC_INNER_PRODUCT,
    *,
    seed: int = 1234,
) -> faiss.Index:
    """A trained, empty index built from ``layout_or_factory`` (an :class:`IVFPQLayout` or a faiss factory string).

    The rotation (OPQ) and the codebooks are trained on at most ``PQ_TRAIN_POINTS`` rows of ``sample`` (codebooks with
    ``PQ_TRAIN_NITER`` k-means iterations: faiss' k-means is slow on 2- to 4-d sub-spaces, measured 35 s for 5,000
    rows at PQ64 on this 2-core machine); the coarse centroids on all of it, with two-level k-means above
    ``TWO_LEVEL_MIN_NLIST`` lists. For the inner-product metric the k-means is spherical (unit-norm centroids), as
    cosine search on normalised vectors wants.
    """
    factory = layout_or_factory.factory if isinstance(layout_or_factory, IVFPQLayout) else str(layout_or_factory)
    x = np.ascontiguousarray(sample, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"sample must be a non-empty 2-D array (N × D), got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("sample holds NaN or infinite values.")
    index = faiss.index_factory(x.shape[1], factory, metric)
    ivf = faiss.extract_index_ivf(index)
    if x.shape[0] < ivf.nlist:
        raise ValueError(f"sample has {x.shape[0]} rows, fewer than the {ivf.nlist} lists of {factory!r}.")
    rng = np.random.default_rng(seed)
    small = x if x.shape[0] <= PQ_TRAIN_POINTS else x[np.sort(rng.choice(x.shape[0], PQ_TRAIN_POINTS, replace=False))]
    outer = faiss.downcast_index(index)
    if isinstance(outer, faiss.IndexPreTransform):
        for i in range(outer.chain.size()):
            transform = outer.chain.at(i)
            transform.train(small)
            x, small = transform.apply(x), transform.apply(small)
    spherical = metric == faiss.METRIC_INNER_PRODUCT
    if ivf.nlist >= TWO_LEVEL_MIN_NLIST:
        centroids, _ = two_level_clustering(x, int(math.sqrt(ivf.nlist)), ivf.nlist, spherical=spherical, seed=seed)
    else:
        kmeans = faiss.Kmeans(x.shape[1], ivf.nlist, niter=20, spherical=spherical, seed=seed)
        kmeans.train(x)
        centroids = kmeans.centroids
    ivf.quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFPQ):
        ivf.do_polysemous_training = False  # on by default; it serves only Hamming pre-filtering, which we do not use
        ivf.pq.cp.niter = PQ_TRAIN_NITER
    ivf.train(small)  # the quantizer holds nlist centroids, so this trains only the codebooks (on residuals)
    index.is_trained = True
    return index


def write_ondisk(
    trained: faiss.Index,
    chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    folder: str | os.PathLike,
    stem: str,
    progress: bool = False,
    *,
    shard_items: int = DEFAULT_SHARD_ITEMS,
) -> Path:
    """Encode ``(vectors, ids)`` chunks into ``folder/stem.faiss`` with its lists in ``folder/stem.ivfdata``.

    ``trained`` is left untouched (each shard is a clone). ``ids`` are int64 global row numbers, one per vector.
    At most ``shard_items`` codes are held in memory: a fuller shard is written to a temporary file in ``folder``,
    and the shards' lists are merged on disk at the end. Both files are written under temporary names and renamed
    into place, the ``.ivfdata`` first, so a reader never finds a ``stem.faiss`` whose lists are incomplete.
    Returns the path of ``stem.faiss``.
    """
    if trained.ntotal != 0 or not trained.is_trained:
        raise ValueError("write_ondisk needs a trained, empty index (train_ivf's result).")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target, ivfdata = folder / f"{stem}.faiss", folder / f"{stem}.ivfdata"
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{stem}.shards-") as scratch:
        shards: list[str] = []
        shard = faiss.clone_index(trained)
        assigner = group_assigner(trained)
        bar = tqdm(desc=f"encoding {stem}", unit="vec", disable=not progress)
        for number, (vectors, ids) in enumerate(chunks):
            x, rows = _chunk(vectors, ids, trained.d, number)
            if len(rows):
                _add(shard, x, rows, assigner)
                bar.update(len(rows))
            if shard.ntotal >= shard_items:
                shards.append(_write_shard(shard, scratch, len(shards)))
                shard = faiss.clone_index(trained)
        if shard.ntotal or not shards:
            shards.append(_write_shard(shard, scratch, len(shards)))
        del shard
        bar.close()
        merged = faiss.clone_index(trained)
        staged_data = Path(scratch) / "merged.ivfdata"
        merge_ondisk(merged, shards, str(staged_data))
        # The .faiss file records the lists' file name; with IO_FLAG_ONDISK_SAME_DIR only its base name is used,
        # so record the final name before writing, then move the lists there.
        invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(merged).invlists)
        invlists.filename = str(ivfdata)
        staged_index = Path(scratch) / "merged.faiss"
        faiss.write_index(merged, str(staged_index))
        del merged, invlists  # unmaps the lists before they are moved
        for path in (staged_data, staged_index):
            with open(path, "rb+") as stream:
                os.fsync(stream.fileno())
        os.replace(staged_data, ivfdata)
        os.replace(staged_index, target)
    return target


def _chunk(vectors: np.ndarray, ids: np.ndarray, dim: int, number: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    rows = np.ascontiguousarray(ids, dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"chunk {number}: vectors must be N × {dim}, got shape {x.shape}.")
    if rows.shape != (x.shape[0],):
        raise ValueError(f"chunk {number}: {x.shape[0]} vectors but ids of shape {rows.shape}; give one id per row.")
    if len(rows) and rows.min() < 0:
        raise ValueError(f"chunk {number}: ids must be non-negative row numbers, got {int(rows.min())}.")
    return x, rows


def _add(shard: faiss.Index, x: np.ndarray, rows: np.ndarray, assigner: GroupAssigner | None) -> None:
    if assigner is None:
        shard.add_with_ids(x, rows)
        return
    outer = faiss.downcast_index(shard)
    if isinstance(outer, faiss.IndexPreTransform):
        for i in range(outer.chain.size()):
            x = outer.chain.at(i).apply(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    lists = np.ascontiguousarray(assigner.assign(x), dtype=np.int64)
    ivf = faiss.extract_index_ivf(shard)
    ivf.add_core(len(x), faiss.swig_ptr(x), faiss.swig_ptr(rows), faiss.swig_ptr(lists))
    shard.ntotal = ivf.ntotal


def _write_shard(shard: faiss.Index, scratch: str, number: int) -> str:
    path = str(Path(scratch) / f"shard-{number:05d}.faiss")
    faiss.write_index(shard, path)
    return path


def read_ondisk(path: str | os.PathLike) -> faiss.Index:
    """Read an index written by :func:`write_ondisk`; its lists stay on disk, memory-mapped from the same folder
    (and scanned without faiss' per-search prefetch threads: :func:`.storage.without_prefetch_threads`)."""
    path = Path(path)
    ivfdata = path.with_suffix(".ivfdata")
    for needed in (path, ivfdata):
        if not needed.is_file():
            raise FileNotFoundError(
                f"{needed} is missing: an on-disk ivfpq index needs {path.name} and {ivfdata.name}."
            )
    return without_prefetch_threads(faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR))


def search_refined(
    index: faiss.Index,
    embeddings: np.ndarray | Callable[[np.ndarray], np.ndarray],
    queries: np.ndarray,
    k: int,
    *,
    refine: int = DEFAULT_REFINE,
    params: faiss.SearchParameters | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)``, each ``len(queries) × k``: the index's ``k × refine`` best candidates re-scored exactly.

    ``embeddings`` is an array indexed by row (a float16 ``np.load(..., mmap_mode="r")`` reads only the candidates'
    rows) or a callable that returns the float32 vectors of sorted, unique rows. Scores are inner products, highest
    first; missing results are ``-inf`` with row ``-1``.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    candidates = max(k, k * max(1, int(refine)))
    _, found = numpy_method(index, "search")(q, candidates, params=params)
    rows = np.unique(found[found >= 0])
    if callable(embeddings):
        vectors = np.asarray(embeddings(rows), dtype=np.float32)
    else:
        vectors = np.asarray(embeddings[rows], dtype=np.float32)  # sorted rows: sequential reads of a memory map
    position = np.searchsorted(rows, np.where(found >= 0, found, rows[0] if len(rows) else 0))
    if len(rows):
        exact = np.einsum("qd,qcd->qc", q, vectors[position], optimize=True)
    else:
        exact = np.zeros(found.shape, dtype=np.float32)
    exact = np.where(found >= 0, exact, -np.inf).astype(np.float32)
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(exact, order, axis=1)
    best = np.take_along_axis(found, order, axis=1)
    best[~np.isfinite(scores)] = -1
    return scores, best
