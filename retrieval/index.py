"""A searchable, changeable index of image embeddings (faiss), kept in a folder of memory-mapped files.

:class:`EmbeddingIndex` holds float32 L2-normalised embeddings with an id (str), a label, a path and any metadata
columns per item, and faiss indexes over them for inner-product (= cosine) search. It implements
:class:`~.protocol.GalleryIndex`. Kinds (:mod:`.kinds`):

- ``"exact"``: ``IndexFlatIP``, exhaustive;
- ``"hnsw"``: ``IndexHNSWFlat`` (``ef_search`` trades speed for recall);
- ``"ivf"``: ``IndexIVFFlat`` with ``nlist ≈ sqrt(N)`` lists (``nprobe`` trades speed for recall);
- ``"ivfpq"``: compressed, for 10^7 items and more (:mod:`.ivfpq`).

The search setting of an approximate index (``ef_search``, ``nprobe``) is, unless given, calibrated on the data when
the index is built: the smallest one whose recall@10 against exact search reaches ``target_recall`` (0.95) on a
held-out sample (:mod:`.calibration`).

Items live in **segments** (:mod:`.segments`): the build is one, each :meth:`add` appends one (upsert: the old row of
an id that is added again is removed), :meth:`remove` marks rows in a tombstone bitmap, and :meth:`compact` rewrites
the live rows as one segment. faiss cannot remove from an HNSW graph in place, so every kind uses tombstones and
compaction the same way: removed rows are skipped inside faiss' search (an id selector, :mod:`.selection`) and never
come back. Filters (``search(..., filter={"label": ["a"]})``) use the same selector.

A saved index is a folder (:mod:`.storage`); once saved or loaded the index is bound to it and every change is written
there atomically (:mod:`.folder`). A loaded index keeps nothing per item on the heap: the Arrow columns, the vectors,
the head tokens and the id lookup are memory-mapped. Around it: :mod:`.builder` (a build that streams chunks to a
folder), :mod:`.duplicates`, :mod:`.hub`, and :mod:`.gallery` (embedding; it does not import this).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import folder as folders
from .columns import BASE_COLUMNS, item_table
from .head_tokens import HeadTokens
from .kinds import DEFAULT_EF_CONSTRUCTION, DEFAULT_HNSW_M, DEFAULT_TARGET_RECALL, default_nlist, initial_params
from .queries import IndexQueries
from .storage import KINDS
from .vectors import normalise_rows

__all__ = [
    "EmbeddingIndex", "normalise_rows", "default_nlist", "DEFAULT_HNSW_M", "DEFAULT_EF_CONSTRUCTION",
    "DEFAULT_TARGET_RECALL",
]  # fmt: skip


class EmbeddingIndex(IndexQueries):
    """Embeddings + ids/labels/paths/metadata + faiss inner-product indexes over them (see the module docstring).

    Args:
        embeddings: N × D array; stored as float32 and L2-normalised row by row (scores are cosines).
        ids: N unique identifiers (str; ints are turned into str).
        labels: N class names (str or None each), or None.
        paths: N file paths (str or None each), or None.
        kind: ``"exact"`` (default), ``"hnsw"``, ``"ivf"`` or ``"ivfpq"``.
        hnsw_m, ef_construction: HNSW graph degree and build beam width.
        ef_search: HNSW search beam width; None (default) measures the smallest one whose recall@10 against
            exact search reaches ``target_recall`` on a sample of the data (see :mod:`.calibration`).
        nlist: IVF lists (default :func:`default_nlist`, about sqrt(N); ``ivfpq``: from the memory budget).
        nprobe: IVF lists visited per query; None (default) is calibrated like ``ef_search``.
        target_recall: the recall@10 the calibration aims for (default 0.95).
        model: a reference to the model that made the embeddings (see ``embedding.model_reference``).
        calibration: the record of an earlier calibration (kept when loading a saved index).
        head_tokens: each item's head tokens, for re-ranking (:class:`~.head_tokens.HeadTokens`), or None.
        metadata: extra per-item columns ``{name: N values}`` (strings, numbers, booleans), for filters and results.
        max_memory, refine: ``ivfpq`` only: the memory budget (bytes or "2G") and the re-scored candidates per result.
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
        metadata: Mapping[str, Sequence[Any]] | None = None,
        max_memory: int | str | None = None,
        refine: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not one of {KINDS}.")
        vectors = normalise_rows(embeddings, "embeddings")
        count, dim = vectors.shape
        table = item_table(ids, labels, paths, metadata, count)
        tokens = HeadTokens.rows_checked(head_tokens, count)
        params = initial_params(kind, count, hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search,
                                nlist=nlist, nprobe=nprobe, max_memory=max_memory, refine=refine)  # fmt: skip
        token_info = None if tokens is None else (list(tokens.tokens.shape[1:]), tokens.token_stage)
        self._setup(kind, dim, params, dict(calibration) if calibration else None, dict(model or {}), token_info)
        segment, found = folders.build_segment(self, 0, table, vectors, tokens, target_recall)
        self.calibration = found or self.calibration
        self._set_segments([segment], np.zeros(0, np.uint8))

    @classmethod
    def from_gallery(cls, gallery: Any, kind: str = "exact", **kwargs: Any) -> EmbeddingIndex:
        """The index over a :class:`~.gallery.Gallery` (embedded images and metadata); ``kwargs``: index settings.

        A gallery's ``metadata`` columns (``{name: values}``, e.g. from ``--metadata_columns``) are kept."""
        options = {"model": gallery.model, "head_tokens": gallery.head_tokens, **kwargs}
        if getattr(gallery, "metadata", None):
            options.setdefault("metadata", gallery.metadata)
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

    @classmethod
    def from_shards(
        cls, directory: str | os.PathLike, shards: Any, *, kind: str = "exact", **options: Any
    ) -> EmbeddingIndex:
        """Build the folder ``directory`` from ``shards`` (mappings with ``embeddings``, ``ids`` and optionally
        ``labels``, ``paths``, ``metadata``, ``head_tokens``) chunk by chunk, without gathering them in RAM
        (:class:`~.builder.IndexBuilder`); ``options``: ``model``, ``token_stage``, ``progress`` and the constructor's
        index settings. Returns the index, loaded from the folder."""
        from .builder import from_shards

        return cls.load(from_shards(directory, shards, kind=kind, **options))

    def __repr__(self) -> str:
        return f"EmbeddingIndex(kind={self.kind!r}, count={len(self)}, dim={self.dim}, params={self.params})"

    # -- changes (GalleryIndex) ----------------------------------------------------------------------------------
    def add(
        self,
        embeddings: Any,
        ids: Sequence[Any],
        labels: Sequence[str | None] | None = None,
        paths: Sequence[str | None] | None = None,
        metadata: Mapping[str, Sequence[Any]] | None = None,
        *,
        head_tokens: Any = None,
        model: Mapping[str, Any] | None = None,
    ) -> None:
        """Add items as a new segment; an id already in the index is replaced (upsert: its old row is removed).

        ``model``: the reference of the model that made ``embeddings`` (``inference.embedding.model_reference``);
        embeddings of another model than the index's are refused, naming both. ``head_tokens`` (N×T×C, or a
        :class:`~.head_tokens.HeadTokens`) are required when the index stores tokens for re-ranking. Persisted
        atomically when the index is bound to a folder.
        """
        self._check_model(model)
        vectors = normalise_rows(embeddings, "embeddings")
        count = len(vectors)
        if vectors.shape[1] != self.dim:
            raise ValueError(
                f"embeddings have dimension {vectors.shape[1]} but this index holds dimension {self.dim}: embed "
                "them with the model that built the index."
            )
        table = item_table(ids, labels, paths, metadata, count, schema=self.schema)
        tokens = self._checked_tokens(head_tokens, count)
        replaced = self.rows_of(table.column("id").to_pylist())
        segment, _ = folders.build_segment(self, self.rows, table, vectors, tokens)
        removed = folders.with_removed(self, replaced[replaced >= 0], self.rows + count)
        folders.change(self, [*self.segments, segment], removed)

    def remove(self, ids: Sequence[Any]) -> int:
        """Remove the items ``ids`` (tombstones until :meth:`compact`); returns how many were present."""
        rows = self.rows_of([str(i) for i in ids])
        rows = np.unique(rows[rows >= 0])
        if len(rows):
            folders.change(self, self.segments, folders.with_removed(self, rows, self.rows))
        return int(len(rows))

    def compact(self) -> EmbeddingIndex:
        """Rewrite the live rows as one segment (removed rows dropped, rows renumbered); search results unchanged."""
        if self.folder is None:
            folders.change(self, [folders.compacted_segment(self)], np.zeros(0, np.uint8))
        else:  # streamed from the mapped files into the folder (no gathering of the live rows in RAM)
            from .compaction import write_compacted

            folders.change(self, [], np.zeros(0, np.uint8), lambda folder, name: write_compacted(self, folder, name))
        return self

    def _check_model(self, model: Mapping[str, Any] | None) -> None:
        if not model:
            return
        ours, theirs = self.model.get("fingerprint"), model.get("fingerprint")
        if ours and theirs and ours != theirs:
            raise ValueError(
                f"these embeddings come from the model {model.get('name_or_path') or 'unknown'!r} (fingerprint "
                f"{theirs}), but the index was built with {self.model.get('name_or_path') or 'unknown'!r} (fingerprint "
                f"{ours}): embed the new images with the index's model, or build a new index."
            )
        if not self.model:
            self.model = dict(model)

    def _checked_tokens(self, head_tokens: Any, count: int) -> HeadTokens | None:
        if self.token_shape is None:
            if head_tokens is not None:
                raise ValueError("this index stores no head tokens: add items without head_tokens.")
            return None
        if head_tokens is None:
            raise ValueError(
                f"this index stores head tokens for re-ranking ({self.token_shape}): pass head_tokens for the new "
                "items (embed them with the index's model and its re-ranker)."
            )
        stage = head_tokens.token_stage if isinstance(head_tokens, HeadTokens) else self.token_stage
        tokens = HeadTokens.from_array(getattr(head_tokens, "tokens", head_tokens), stage, count)
        if list(tokens.tokens.shape[1:]) != list(self.token_shape) or stage != self.token_stage:
            raise ValueError(
                f"head_tokens are {list(tokens.tokens.shape[1:])} from {stage!r}, but the index stores "
                f"{self.token_shape} from {self.token_stage!r}."
            )
        return tokens

    # -- saving and loading ------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, *, bind: bool = True) -> Path:
        """Write the index folder atomically (built in a temporary sibling folder, then swapped in).

        With ``bind`` (default) the index then reads from that folder (memory-mapped) and later changes are written
        there."""
        return folders.save(self, Path(directory), bind=bind)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> EmbeddingIndex:
        """Read a folder written by :meth:`save` (format 2, memory-mapped; or format 1), checking its files agree."""
        return folders.load(cls, Path(directory))

    def info(self) -> dict[str, Any]:
        """``kind``, ``count`` (live items), ``removed`` (rows awaiting :meth:`compact`), ``bytes_on_disk``,
        ``model``, and the rest of what the manifest says (dim, params, segments, columns, head tokens)."""
        return folders.info(self)

    def columns(self) -> list[str]:
        """The names of the per-item columns (``id``, ``label``, ``path`` and the metadata columns)."""
        return list(self.schema.names)

    @property
    def metadata_columns(self) -> list[str]:
        return [name for name in self.schema.names if name not in BASE_COLUMNS]

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
