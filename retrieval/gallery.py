"""Embed a gallery (an image folder or a ``datasets.Dataset``) into arrays and metadata, in one or several processes.

This module knows nothing of :class:`~crossmetric.retrieval.index.EmbeddingIndex`: it returns a :class:`Gallery`
(embeddings, ids, labels, paths, model reference) that the index is built from (``EmbeddingIndex.from_gallery``), so
that the dependency runs one way (``index`` -> ``gallery``; ``build`` wires the two for the command line).

Sources: an image folder (ids are the files' paths relative to the folder; the label is the top-level
sub-folder when every image lies in one, as in a one-class-per-folder layout) or a ``datasets.Dataset`` (ids
from ``id_column`` or the row number, labels from ``label_column``, paths from the undecoded image records).

:class:`GallerySource` lists a gallery once and reads it in row ranges: the resumable, sharded build
(:mod:`.build`, :mod:`.shards`) embeds it shard by shard, in one process or in every process of an ``accelerate
launch``, without any process holding the whole gallery. Images that cannot be decoded are skipped (with a warning).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.image_loading import list_image_files
from ..inference.embedding import embed_images, embeddings_and_reranker_tokens, model_reference, pooler_output
from ..inference.loading import load_embedder
from ..inference.reranker_loading import find_reranker, no_reranker_message, reranker_config
from .head_tokens import HeadTokens

logger = logging.getLogger(__name__)


@dataclass
class ImageRecords:
    """What to embed (``sources``: paths or a dataset) and, per row, its id, label, path and metadata columns."""

    sources: Any
    ids: list[str]
    labels: list[str | None] | None
    paths: list[str | None] | None
    image_column: str = "image"
    metadata: dict[str, list[Any]] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: np.ndarray) -> Any:
        """The sources of ``rows`` (a dataset ``select`` or a list)."""
        if hasattr(self.sources, "select"):
            return self.sources.select(rows.tolist())
        return [self.sources[i] for i in rows.tolist()]


def _check_dataset(dataset: Any, image_column: str, id_column: str | None, metadata_columns: Sequence[str]) -> None:
    from datasets import Dataset, DatasetDict

    if isinstance(dataset, DatasetDict):
        raise ValueError(f"pass one split of the DatasetDict (splits: {list(dataset)}), e.g. dataset['test'].")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}.")
    columns = dataset.column_names
    for name, column in (("image_column", image_column), ("id_column", id_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{name}={column!r} is not a column of the dataset; its columns: {columns}.")
    unknown = [c for c in metadata_columns if c not in columns]
    if unknown:
        raise ValueError(f"metadata_columns {unknown} are not columns of the dataset; its columns: {columns}.")
    if image_column in metadata_columns:
        raise ValueError(f"metadata_columns: {image_column!r} is the image column; name other columns to keep.")
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows.")


def _column_values(dataset: Any, column: str) -> list[Any]:
    """A column's values; a ``ClassLabel`` column's as class names (str), other labels as str."""
    from datasets import ClassLabel

    feature, values = dataset.features[column], list(dataset[column])
    return feature.int2str(values) if isinstance(feature, ClassLabel) else values


def dataset_records(
    dataset: Any,
    image_column: str = "image",
    label_column: str | None = "label",
    id_column: str | None = None,
    metadata_columns: Sequence[str] = (),
    offset: int = 0,
) -> ImageRecords:
    """Rows of a ``datasets.Dataset``: ids from ``id_column`` (else the row number, counted from ``offset``: the
    position of this part in the whole gallery), labels (ClassLabel names or str values) from ``label_column`` when
    the dataset has it, paths from the image records where stored, and the ``metadata_columns`` values."""
    from datasets import Image as ImageFeature

    _check_dataset(dataset, image_column, id_column, metadata_columns)
    columns = dataset.column_names
    count = len(dataset)
    ids = [str(v) for v in dataset[id_column]] if id_column else [str(offset + i) for i in range(count)]
    labels = None
    if label_column is not None and label_column in columns:
        labels = [None if v is None else str(v) for v in _column_values(dataset, label_column)]
    paths = None
    if getattr(dataset.features[image_column], "dtype", None) == "string":  # a column of file paths
        paths = list(dataset[image_column])
    elif isinstance(dataset.features[image_column], ImageFeature):
        raw = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
        paths = []
        for table in raw.with_format("arrow").iter(batch_size=1024):
            paths += table.column(image_column).combine_chunks().field("path").to_pylist()
    metadata = {column: _column_values(dataset, column) for column in metadata_columns} or None
    return ImageRecords(dataset, ids, labels, paths, image_column, metadata)


class GallerySource:
    """A gallery (an image folder or a ``datasets.Dataset``) listed once and read in row ranges: what the sharded
    build embeds shard by shard. A dataset's ids, labels, paths and metadata are read per range, never all at once;
    a folder's file list is held (listing the folder is how its order is known)."""

    def __init__(
        self,
        images: Any,
        image_column: str = "image",
        label_column: str | None = "label",
        id_column: str | None = None,
        metadata_columns: Sequence[str] | None = None,
    ) -> None:
        self.image_column, self.label_column, self.id_column = image_column, label_column, id_column
        self.metadata_columns = tuple(metadata_columns or ())
        self.dataset = None
        if isinstance(images, (str, os.PathLike)):
            if self.metadata_columns:
                raise ValueError(
                    f"--metadata_columns {list(self.metadata_columns)} needs a dataset gallery: an image folder has "
                    "no columns (its labels are the sub-folder names)."
                )
            self.root = Path(images)
            self.files = list_image_files(self.root)
            if not self.files:
                raise ValueError(f"images folder {str(self.root)!r} holds no image files.")
            self.relative = [f.relative_to(self.root).as_posix() for f in self.files]
            self.in_subfolders = all("/" in r for r in self.relative)
            if not self.in_subfolders:
                logger.info("Some images lie directly in %s: no labels taken from sub-folder names.", self.root)
        else:
            _check_dataset(images, image_column, id_column, self.metadata_columns)
            self.dataset = images

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.files)

    def fingerprint(self) -> str:
        """Changes when the gallery does: a folder's relative paths, sizes and modification times; a dataset's
        ``datasets`` fingerprint (which follows its files and every transform applied) and length."""
        if self.dataset is not None:
            fingerprint = getattr(self.dataset, "_fingerprint", None) or "unknown"
            return f"dataset:{fingerprint}:{len(self.dataset)}:{','.join(self.dataset.column_names)}"
        digest = hashlib.sha256()
        for file, relative in zip(self.files, self.relative):
            stat = file.stat()
            digest.update(f"{relative}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return f"folder:{digest.hexdigest()}"

    def records(self, start: int = 0, stop: int | None = None) -> ImageRecords:
        """The records of rows ``[start, stop)`` of the gallery."""
        stop = len(self) if stop is None else stop
        if self.dataset is not None:
            part = self.dataset.select(range(start, stop))
            return dataset_records(
                part, self.image_column, self.label_column, self.id_column, self.metadata_columns, offset=start
            )
        files = [str(f) for f in self.files[start:stop]]
        relative = self.relative[start:stop]
        labels = [r.split("/", 1)[0] for r in relative] if self.in_subfolders else None
        return ImageRecords(files, relative, labels, list(files))


def folder_records(folder: str | os.PathLike) -> ImageRecords:
    """Every image file under ``folder`` (sorted by relative path); labels from one-class-per-sub-folder layout."""
    return GallerySource(folder).records()


def as_records(
    images: Any,
    image_column: str = "image",
    label_column: str | None = "label",
    id_column: str | None = None,
    metadata_columns: Sequence[str] | None = None,
) -> ImageRecords:
    """The records of the whole gallery ``images`` (a folder path or a dataset); see :class:`GallerySource`."""
    if isinstance(images, ImageRecords):
        return images
    return GallerySource(images, image_column, label_column, id_column, metadata_columns).records()


# Keyword arguments of the embedding step; every other keyword of ``EmbeddingIndex.from_folder`` goes to the index.
EMBED_OPTIONS = frozenset(
    {
        "image_processor",
        "backend",
        "batch_size",
        "device",
        "progress",
        "num_workers",
        "image_column",
        "label_column",
        "id_column",
        "metadata_columns",
        "head_tokens",
    }
)


def tokens_to_store(model: Any, head_tokens: bool | None, backend: str) -> tuple[str | None] | None:
    """``(token_stage,)`` when the gallery's head tokens are to be stored (for re-ranking), else None.

    ``head_tokens`` None stores them when the model (an exported folder or Hub id) has a re-ranker; True requires it;
    False never stores them. The ONNX backend gives the embedding only, so it stores none (and True is refused).
    """
    if head_tokens is False:
        return None
    location = find_reranker(model) if isinstance(model, (str, os.PathLike)) else None
    if location is None:
        if head_tokens:
            raise ValueError(no_reranker_message(model, "head_tokens=True", "model"))
        return None
    if backend != "torch":
        if head_tokens:
            raise ValueError("head_tokens=True needs the torch backend: the ONNX graph outputs the embedding only.")
        logger.info(
            "Not storing the head's tokens: the ONNX backend gives the embedding only (re-ranking needs torch)."
        )
        return None
    return (reranker_config(location).token_stage,)


@dataclass
class Gallery:
    """Embedded images and their metadata, row-aligned: what an index is built from.

    Attributes:
        embeddings: float32, one L2-normalised row per decoded image.
        ids, labels, paths: per row (``labels``/``paths`` may be None as a whole).
        model: the reference of the model that embedded them (``embedding.model_reference``).
        head_tokens: each row's head tokens (float16), for re-ranking, when the model has a re-ranker.
        metadata: other per-row columns kept from a dataset (``metadata_columns``), or None.
    """

    embeddings: np.ndarray
    ids: list[str]
    labels: list[str | None] | None
    paths: list[str | None] | None
    model: dict[str, Any]
    head_tokens: HeadTokens | None = None
    metadata: dict[str, list[Any]] | None = None

    @classmethod
    def from_rows(
        cls, records: ImageRecords, embeddings: np.ndarray, rows: np.ndarray, model: dict, tokens: Any = None
    ) -> Gallery:
        """The gallery of the embedded ``rows`` of ``records`` (unreadable rows are absent); ``tokens``:
        ``(token_stage, N×T×C array)`` of the same rows, or None."""
        pick = rows.tolist()
        metadata = {name: [values[i] for i in pick] for name, values in (records.metadata or {}).items()}
        return cls(
            embeddings,
            [records.ids[i] for i in pick],
            [records.labels[i] for i in pick] if records.labels is not None else None,
            [records.paths[i] for i in pick] if records.paths is not None else None,
            model,
            HeadTokens.from_array(tokens[1], tokens[0], len(pick)) if tokens is not None else None,
            metadata or None,
        )


def split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword arguments into those of :func:`embed_gallery` and those of the index constructor."""
    embed = {k: v for k, v in options.items() if k in EMBED_OPTIONS}
    return embed, {k: v for k, v in options.items() if k not in EMBED_OPTIONS}


def embed_gallery(
    model: Any,
    images: Any,
    *,
    image_processor: Any | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    num_workers: int = 0,
    image_column: str = "image",
    label_column: str | None = "label",
    id_column: str | None = None,
    metadata_columns: Sequence[str] | None = None,
    backend: str = "torch",
    head_tokens: bool | None = None,
) -> Gallery:
    """Embed ``images`` (a folder or a dataset) with ``model`` (a folder, run, Hub id or model) in this process;
    ``backend="onnx"`` embeds through ONNX Runtime (the folder's ``onnx/model.onnx``). With a model that has a
    re-ranker, the same backbone pass also gives each image's head tokens, stored for re-ranking (see
    :func:`tokens_to_store` for ``head_tokens``)."""
    store = tokens_to_store(model, head_tokens, backend)
    embedder, processor = load_embedder(model, image_processor, backend=backend)
    records = as_records(images, image_column, label_column, id_column, metadata_columns)
    result = embed_images(
        embedder, processor, records.sources, batch_size, device, progress,
        image_column=records.image_column, num_workers=num_workers,
        forward=embeddings_and_reranker_tokens(store[0]) if store else pooler_output,
    )  # fmt: skip
    tokens = (store[0], result.extras["tokens"]) if store else None
    return Gallery.from_rows(records, result.embeddings, result.kept, model_reference(embedder), tokens)
