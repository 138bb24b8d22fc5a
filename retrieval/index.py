"""A searchable index of image embeddings: exact or approximate (faiss), saved without pickle, shared on the Hub.

:class:`EmbeddingIndex` holds float32 L2-normalised embeddings with an id (str), a label (str or None) and a
path (str or None) per row, and a faiss index over them for inner-product (= cosine) search:

- ``kind="exact"``: ``IndexFlatIP``, exhaustive;
- ``kind="hnsw"``: ``IndexHNSWFlat`` with the inner-product metric, in an ``IndexIDMap2`` (``ef_search`` trades
  speed for recall);
- ``kind="ivf"``: ``IndexIVFFlat`` with ``nlist ≈ sqrt(N)`` lists trained (k-means) on the data itself
  (``nprobe`` trades speed for recall).

The search setting of an approximate index (``ef_search``, ``nprobe``) is, unless given, calibrated on the data
when the index is built: the smallest one whose recall@10 against exact search reaches ``target_recall`` (0.95)
on a sample (see :mod:`.calibration` for why no fixed default works).

A saved index is a folder of three files (a fourth with the head's tokens for re-ranking, :mod:`.head_tokens`), none
of them a pickle (see :mod:`.storage`), written next to its target and swapped in, so an interrupted save leaves the
previous one readable; :meth:`EmbeddingIndex.load` checks that the files agree before anything is searched.

Around it: :mod:`.storage`, :mod:`.calibration`, :mod:`.hub`, and :mod:`.gallery` (embedding; it does not import this).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from safetensors.numpy import save_file

from ..utils.atomic_files import staged_directory
from .calibration import calibrate, calibration_split, search_steps, set_search_param
from .head_tokens import HeadTokens
from .storage import (
    EMBEDDINGS_FILE,
    EMBEDDINGS_KEY,
    FORMAT_VERSION,
    INDEX_FILE,
    KINDS,
    METADATA_FILE,
    IndexFormatError,
    read_embeddings,
    read_faiss,
    read_metadata,
)

logger = logging.getLogger(__name__)

# HNSW build settings; the search settings are calibrated on the data (calibration.py).
DEFAULT_HNSW_M = 32
DEFAULT_EF_CONSTRUCTION = 200
DEFAULT_TARGET_RECALL = 0.95


def default_nlist(count: int) -> int:
    """IVF lists for ``count`` vectors: about sqrt(N), with at least 39 training points per list (faiss' minimum)."""
    return max(1, min(round(math.sqrt(count)), count // 39))


def _normalise_rows(array: Any, name: str) -> np.ndarray:
    """float32, 2-D, finite, each row scaled to unit L2 norm (zero rows are an error); a copy of the input."""
    matrix = np.array(array, dtype=np.float32, copy=True)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D array (N × D), got shape {matrix.shape}.")
    if not np.isfinite(matrix).all():
        bad = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise ValueError(f"{name} row {bad} holds NaN or infinite values.")
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{name} row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros: it has no direction.")
    if np.all(np.abs(norms - 1) <= 1e-5):  # already unit length: keep the exact bits (a loaded index stays identical)
        return np.ascontiguousarray(matrix)
    return np.ascontiguousarray(matrix / norms)


def _string_list(values: Sequence[Any] | None, count: int, name: str, allow_none: bool) -> list[Any] | None:
    """Check and copy a per-row column (ids, labels, paths): ``count`` entries, each a str (or None)."""
    if values is None:
        return None
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} embeddings.")
    out = []
    for i, value in enumerate(values):
        if value is None and allow_none:
            out.append(None)
        elif isinstance(value, (str, int, np.integer)) and not isinstance(value, bool):
            out.append(str(value))
        else:
            raise ValueError(f"{name}[{i}] = {value!r}: expected a string.")
    return out


class EmbeddingIndex:
    """Embeddings + ids/labels/paths + a faiss inner-product index over them.

    Args:
        embeddings: N × D array; stored as float32 and L2-normalised row by row (scores are cosines).
        ids: N unique identifiers (str; ints are turned into str).
        labels: N class names (str or None each), or None.
        paths: N file paths (str or None each), or None.
        kind: ``"exact"`` (default), ``"hnsw"`` or ``"ivf"``.
        hnsw_m, ef_construction: HNSW graph degree and build beam width.
        ef_search: HNSW search beam width; None (default) measures the smallest one whose recall@10 against
            exact search reaches ``target_recall`` on a sample of the data (see :mod:`.calibration`).
        nlist: IVF lists (default :func:`default_nlist`, about sqrt(N)).
        nprobe: IVF lists visited per query; None (default) is calibrated like ``ef_search``.
        target_recall: the recall@10 the calibration aims for (default 0.95).
        model: a reference to the model that made the embeddings (see ``embedding.model_reference``).
        calibration: the record of an earlier calibration (kept when loading a saved index).
        head_tokens: each item's head tokens, for re-ranking (:class:`~.head_tokens.HeadTokens`), or None.
    """

    def __init__(
        self,
        embeddings: Any,
        ids: Sequence[Any],
        labels: Sequence[str | None] | None = None,
        paths: Sequence[str | None] | None = None,
        kind: str = "exact",
        *,
        hnsw_m: int = DEFAULT_HNSW_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef_search: int | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        target_recall: float = DEFAULT_TARGET_RECALL,
        model: dict[str, Any] | None = None,
        calibration: dict[str, Any] | None = None,
        head_tokens: HeadTokens | None = None,
        _faiss_index: Any = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {KINDS}.")
        self.embeddings = _normalise_rows(embeddings, "embeddings")
        count, self.dim = self.embeddings.shape
        self.ids: list[str] = _string_list(ids, count, "ids", allow_none=False)  # type: ignore[assignment]
        if len(set(self.ids)) != count:
            duplicate, times = Counter(self.ids).most_common(1)[0]
            raise ValueError(f"ids must be unique; {duplicate!r} appears {times} times.")
        self.labels = _string_list(labels, count, "labels", allow_none=True)
        self.paths = _string_list(paths, count, "paths", allow_none=True)
        self.kind = kind
        self.model = dict(model or {})
        self.head_tokens = HeadTokens.rows_checked(head_tokens, count)
        if kind == "ivf":
            nlist = default_nlist(count) if nlist is None else int(nlist)
            if not 1 <= nlist <= count:
                raise ValueError(f"nlist={nlist} must be between 1 and the number of embeddings ({count}).")
        hnsw = {"hnsw_m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search}
        ivf = {"nlist": nlist, "nprobe": nprobe}
        self.params: dict[str, int | None] = hnsw if kind == "hnsw" else ivf if kind == "ivf" else {}
        self.calibration: dict[str, Any] | None = dict(calibration) if calibration else None
        self.faiss_index = _faiss_index if _faiss_index is not None else self._build(target_recall)
        self._apply_search_params(self.faiss_index, self.params.get("ef_search"), self.params.get("nprobe"))

    @classmethod
    def from_gallery(cls, gallery: Any, kind: str = "exact", **kwargs: Any) -> EmbeddingIndex:
        """The index over a :class:`~.gallery.Gallery` (embedded images and metadata); ``kwargs``: index settings."""
        options = {"model": gallery.model, "head_tokens": gallery.head_tokens, **kwargs}
        return cls(gallery.embeddings, gallery.ids, gallery.labels, gallery.paths, kind, **options)

    @classmethod
    def from_folder(
        cls, model: Any, folder: str | os.PathLike, *, kind: str = "exact", **kwargs: Any
    ) -> EmbeddingIndex:
        """Embed every image under ``folder`` with ``model`` (an exported folder, a Hub id or a model object).

        Ids are the paths relative to ``folder``; labels the sub-folder names when every image lies in one (one class
        per sub-folder), else None. Unreadable files are skipped with a warning. Other keywords: those of
        :func:`~.gallery.embed_gallery` (``batch_size``, ``device``, ...) and the constructor's index settings.
        """
        from .gallery import embed_gallery, split_options

        embed_options, index_options = split_options(kwargs)
        return cls.from_gallery(embed_gallery(model, folder, **embed_options), kind, **index_options)

    @classmethod
    def from_dataset(
        cls,
        model: Any,
        dataset: Any,
        image_column: str = "image",
        label_column: str | None = "label",
        id_column: str | None = None,
        *,
        kind: str = "exact",
        **kwargs: Any,
    ) -> EmbeddingIndex:
        """Embed the images of a ``datasets.Dataset``; ids from ``id_column`` (default: the row number), labels
        from ``label_column`` (ClassLabel names) when present, paths from the image records where stored."""
        from .gallery import embed_gallery, split_options

        columns = {"image_column": image_column, "label_column": label_column, "id_column": id_column}
        embed_options, index_options = split_options(kwargs | columns)
        return cls.from_gallery(embed_gallery(model, dataset, **embed_options), kind, **index_options)

    # -- building and searching --------------------------------------------------------------------------------
    def _build(self, target_recall: float) -> Any:
        """The faiss index of ``self.kind`` over ``self.embeddings`` (IVF trained on them), ids = row numbers.

        An approximate index without a search setting is calibrated while it is built (held-out sample, see
        :mod:`.calibration`); HNSW is wrapped in ``IndexIDMap2`` so that the sample can be added last.
        """
        vectors, count = self.embeddings, len(self)
        if self.kind == "exact":
            index = faiss.IndexFlatIP(self.dim)
            index.add(vectors)
            return index
        if self.kind == "hnsw":
            graph = faiss.IndexHNSWFlat(self.dim, self.params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = self.params["ef_construction"]
            index = faiss.IndexIDMap2(graph)
        else:
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.params["nlist"], faiss.METRIC_INNER_PRODUCT)
            index.train(vectors)
        param = "ef_search" if self.kind == "hnsw" else "nprobe"
        if self.params[param] is not None or count < 2:
            index.add_with_ids(vectors, np.arange(count, dtype=np.int64))
            self.params[param] = self.params[param] or search_steps(self.kind, index)[0]
            return index
        rest, held = calibration_split(count)
        index.add_with_ids(vectors[rest], rest)
        result = calibrate(index, vectors[rest], rest, vectors[held], self.kind, target=target_recall)
        index.add_with_ids(vectors[held], held)
        self.params[param] = result.value
        self.calibration = result.to_dict()
        logger.info("Calibrated %s=%d (held-out recall@%d %.3f).", param, result.value, result.k, result.recall)
        return index

    @staticmethod
    def _apply_search_params(index: Any, ef_search: int | None, nprobe: int | None) -> None:
        if ef_search is not None and isinstance(index, faiss.IndexIDMap2):
            set_search_param(index, "hnsw", ef_search)
        if nprobe is not None and isinstance(index, faiss.IndexIVF):
            set_search_param(index, "ivf", nprobe)

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"EmbeddingIndex(kind={self.kind!r}, count={len(self)}, dim={self.dim}, params={self.params})"

    def search_arrays(
        self, query_embeddings: Any, k: int = 10, *, ef_search: int | None = None, nprobe: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Raw search: ``(scores, rows)``, both Q × min(k, N), best first; rows are -1 where an approximate
        index found fewer than k neighbours. Queries are L2-normalised first."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        queries = _normalise_rows(query_embeddings, "query_embeddings")
        if queries.shape[1] != self.dim:
            raise ValueError(
                f"query_embeddings have dimension {queries.shape[1]} but this index holds dimension {self.dim}: "
                "embed the queries with the model that built the index."
            )
        # Per-call settings travel as faiss SearchParameters: the shared index is neither changed nor copied.
        params = None
        if ef_search is not None and self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=int(ef_search))
        elif nprobe is not None and self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=int(nprobe))
        # faiss.contrib.torch_utils (imported by e.g. pytorch-metric-learning) replaces ``search`` with a wrapper that
        # drops ``params``; the numpy original stays reachable as ``search_numpy``.
        search = getattr(self.faiss_index, "search_numpy", self.faiss_index.search)
        scores, rows = search(queries, min(int(k), len(self)), params=params)
        return scores, rows

    def search(
        self, query_embeddings: Any, k: int = 10, *, ef_search: int | None = None, nprobe: int | None = None
    ) -> list[list[dict[str, Any]]]:
        """For each query row, its ``k`` nearest entries as ``{"id", "label", "score", "path"}``, best first.

        ``score`` is the inner product of the normalised vectors (cosine similarity). A single 1-D query still
        gives a list with one result list. ``ef_search`` / ``nprobe`` override the HNSW / IVF settings.
        """
        scores, rows = self.search_arrays(query_embeddings, k, ef_search=ef_search, nprobe=nprobe)
        return [self._results(score_row, index_row) for score_row, index_row in zip(scores, rows)]

    def _results(self, scores: np.ndarray, rows: np.ndarray) -> list[dict[str, Any]]:
        return [
            {
                "id": self.ids[row],
                "label": self.labels[row] if self.labels is not None else None,
                "score": float(score),
                "path": self.paths[row] if self.paths is not None else None,
            }
            for score, row in zip(scores.tolist(), rows.tolist())
            if row >= 0
        ]

    # -- saving and loading ------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """The content of ``metadata.json``."""
        from importlib.metadata import version  # not `from .. import __version__`: the package imports this module

        return {
            "format_version": FORMAT_VERSION,
            "library": f"crossmetric {version('crossmetric')}",
            "kind": self.kind,
            "metric": "inner_product",
            "dim": self.dim,
            "count": len(self),
            "params": self.params,
            "calibration": self.calibration,
            "model": self.model,
            "ids": self.ids,
            "labels": self.labels,
            "paths": self.paths,
            "head_tokens": self.head_tokens.info() if self.head_tokens is not None else None,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index folder atomically: built in a temporary sibling folder, then swapped in."""
        target = Path(directory)
        if target.exists() and not target.is_dir():
            raise ValueError(f"cannot save the index to {str(target)!r}: it is a file, not a folder.")
        with staged_directory(target) as staging:
            faiss.write_index(self.faiss_index, str(staging / INDEX_FILE))
            save_file({EMBEDDINGS_KEY: self.embeddings}, str(staging / EMBEDDINGS_FILE), metadata={"format": "np"})
            (staging / METADATA_FILE).write_text(json.dumps(self.metadata(), ensure_ascii=False), encoding="utf-8")
            if self.head_tokens is not None:
                self.head_tokens.save(staging)
        return target

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EmbeddingIndex:
        """Read a folder written by :meth:`save`, checking that its three files agree (no pickle involved)."""
        folder = Path(directory)
        if not folder.is_dir():
            hint = ""
            backups = sorted(folder.parent.glob(f".{folder.name}.old-*")) if folder.parent.is_dir() else []
            if backups:
                hint = f" A save was interrupted while swapping folders; the previous index is in {backups[-1]}."
            raise FileNotFoundError(f"index folder {str(folder)!r} does not exist.{hint}")
        for name in (METADATA_FILE, EMBEDDINGS_FILE, INDEX_FILE):
            if not (folder / name).is_file():
                raise IndexFormatError(
                    f"{folder / name} is missing: an index folder holds {METADATA_FILE}, {EMBEDDINGS_FILE} and "
                    f"{INDEX_FILE} (written by EmbeddingIndex.save)."
                )
        meta = read_metadata(folder / METADATA_FILE)
        count, dim, kind = meta["count"], meta["dim"], meta["kind"]
        embeddings = read_embeddings(folder / EMBEDDINGS_FILE, count, dim)
        index = read_faiss(folder / INDEX_FILE, count, dim, kind)
        if not np.array_equal(index.reconstruct(0), embeddings[0]) or not np.array_equal(
            index.reconstruct(count - 1), embeddings[count - 1]
        ):
            raise IndexFormatError(
                f"{folder / INDEX_FILE} holds other vectors than {folder / EMBEDDINGS_FILE}: the files come from "
                "different saves. Rebuild the index."
            )
        params = meta.get("params") or {}
        tokens = HeadTokens.load(folder, meta["head_tokens"], count) if meta.get("head_tokens") else None
        try:
            return cls(
                embeddings, meta["ids"], meta.get("labels"), meta.get("paths"), kind,
                **{k: params[k] for k in ("ef_search", "nprobe", "nlist", "hnsw_m", "ef_construction") if k in params},
                model=meta.get("model"), calibration=meta.get("calibration"), head_tokens=tokens, _faiss_index=index,
            )  # fmt: skip
        except (ValueError, TypeError) as error:
            raise IndexFormatError(f"{folder / METADATA_FILE}: {error}") from error

    # -- Hub (see hub.py) -------------------------------------------------------------------------------------
    def push_to_hub(self, repo_id: str, *, path_in_repo: str | None = None, **kwargs: Any) -> Any:
        """Upload the index to the model repo ``repo_id`` in one commit (the repo's other files are kept).

        ``path_in_repo="index"`` puts it in the ``index/`` folder of a model repo, so that the model and its
        index travel together (``EmbeddingIndex.from_pretrained(repo_id)`` and the ``image-retrieval``
        pipeline look there). Other keywords: ``private``, ``revision``, ``create_pr``, ``commit_message``,
        ``token``, ``endpoint`` (as ``crossmetric.push_to_hub``). Returns huggingface_hub's ``CommitInfo``.
        """
        from .hub import push_index

        return push_index(self, repo_id, path_in_repo=path_in_repo, **kwargs)

    @classmethod
    def from_pretrained(
        cls, repo_id_or_dir: str | os.PathLike, revision: str | None = None, **kwargs: Any
    ) -> EmbeddingIndex:
        """Load an index from a local folder or a Hub model repo: its root, or its ``index/`` folder.

        Keywords: ``subfolder`` (look only there), ``token``, ``cache_dir``. From the Hub only the index files
        are downloaded, not the model weights.
        """
        from .hub import index_folder

        return cls.load(index_folder(repo_id_or_dir, revision, **kwargs))
