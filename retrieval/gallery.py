"""Embed a gallery (an image folder or a ``datasets.Dataset``) into arrays and metadata, in one or several processes.

This module knows nothing of :class:`~crossmetric.retrieval.index.EmbeddingIndex`: it returns a :class:`Gallery`
(embeddings, ids, labels, paths, model reference) that the index is built from (``EmbeddingIndex.from_gallery``), so
that the dependency runs one way (``index`` -> ``gallery``; ``build`` wires the two for the command line).

Sources: an image folder (ids are the files' paths relative to the folder; the label is the top-level
sub-folder when every image lies in one, as in a one-class-per-folder layout) or a ``datasets.Dataset`` (ids
from ``id_column`` or the row number, labels from ``label_column``, paths from the undecoded image records).

:func:`embed_gallery_distributed` runs under ``accelerate launch`` with N processes: every process lists the same
items in the same order, embeds the rows ``process_index::num_processes``, and saves its shard (safetensors +
JSON, written atomically); the main process waits for all shards and merges them back into the original order.
Images that cannot be decoded are skipped (with a warning) in both paths.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from ..data.image_loading import list_image_files
from ..inference.embedding import embed_images, embeddings_and_reranker_tokens, model_reference, pooler_output
from ..inference.loading import load_embedder
from ..inference.reranker_loading import find_reranker, no_reranker_message, reranker_config
from ..utils.atomic_files import write_atomic
from .head_tokens import HeadTokens

logger = logging.getLogger(__name__)


@dataclass
class ImageRecords:
    """What to embed (``sources``: paths or a dataset) and, per row, its id, label and path."""

    sources: Any
    ids: list[str]
    labels: list[str | None] | None
    paths: list[str | None] | None
    image_column: str = "image"

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, rows: np.ndarray) -> Any:
        """The sources of ``rows`` (a dataset ``select`` or a list)."""
        if hasattr(self.sources, "select"):
            return self.sources.select(rows.tolist())
        return [self.sources[i] for i in rows.tolist()]


def folder_records(folder: str | os.PathLike) -> ImageRecords:
    """Every image file under ``folder`` (sorted by relative path); labels from one-class-per-sub-folder layout."""
    root = Path(folder)
    files = list_image_files(root)
    if not files:
        raise ValueError(f"images folder {str(root)!r} holds no image files.")
    relative = [f.relative_to(root).as_posix() for f in files]
    in_subfolders = all("/" in r for r in relative)
    labels = [r.split("/", 1)[0] for r in relative] if in_subfolders else None
    if not in_subfolders:
        logger.info("Some images lie directly in %s: no labels taken from sub-folder names.", root)
    return ImageRecords([str(f) for f in files], relative, labels, [str(f) for f in files])


def dataset_records(
    dataset: Any, image_column: str = "image", label_column: str | None = "label", id_column: str | None = None
) -> ImageRecords:
    """Rows of a ``datasets.Dataset``: ids from ``id_column`` (else the row number), labels (ClassLabel names or
    str values) from ``label_column`` when the dataset has it, paths from the image records where stored."""
    from datasets import ClassLabel, Dataset, DatasetDict
    from datasets import Image as ImageFeature

    if isinstance(dataset, DatasetDict):
        raise ValueError(f"pass one split of the DatasetDict (splits: {list(dataset)}), e.g. dataset['test'].")
    if not isinstance(dataset, Dataset):
        raise TypeError(f"expected a datasets.Dataset, got {type(dataset).__name__}.")
    columns = dataset.column_names
    for name, column in (("image_column", image_column), ("id_column", id_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{name}={column!r} is not a column of the dataset; its columns: {columns}.")
    if len(dataset) == 0:
        raise ValueError("the dataset has no rows.")
    ids = [str(v) for v in dataset[id_column]] if id_column else [str(i) for i in range(len(dataset))]
    labels = None
    if label_column is not None and label_column in columns:
        feature, values = dataset.features[label_column], list(dataset[label_column])
        labels = (
            feature.int2str(values)
            if isinstance(feature, ClassLabel)
            else [None if v is None else str(v) for v in values]
        )
    paths = None
    if getattr(dataset.features[image_column], "dtype", None) == "string":  # a column of file paths
        paths = list(dataset[image_column])
    elif isinstance(dataset.features[image_column], ImageFeature):
        raw = dataset.select_columns([image_column]).cast_column(image_column, ImageFeature(decode=False))
        paths = []
        for table in raw.with_format("arrow").iter(batch_size=1024):
            paths += table.column(image_column).combine_chunks().field("path").to_pylist()
    return ImageRecords(dataset, ids, labels, paths, image_column)


def as_records(
    images: Any, image_column: str = "image", label_column: str | None = "label", id_column: str | None = None
) -> ImageRecords:
    """:func:`folder_records` for a folder path, :func:`dataset_records` for a dataset."""
    if isinstance(images, ImageRecords):
        return images
    if isinstance(images, (str, os.PathLike)):
        return folder_records(images)
    return dataset_records(images, image_column, label_column, id_column)


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
    """

    embeddings: np.ndarray
    ids: list[str]
    labels: list[str | None] | None
    paths: list[str | None] | None
    model: dict[str, Any]
    head_tokens: HeadTokens | None = None

    @classmethod
    def from_rows(
        cls, records: ImageRecords, embeddings: np.ndarray, rows: np.ndarray, model: dict, tokens: Any = None
    ) -> Gallery:
        """The gallery of the embedded ``rows`` of ``records`` (unreadable rows are absent); ``tokens``:
        ``(token_stage, N×T×C array)`` of the same rows, or None."""
        pick = rows.tolist()
        return cls(
            embeddings,
            [records.ids[i] for i in pick],
            [records.labels[i] for i in pick] if records.labels is not None else None,
            [records.paths[i] for i in pick] if records.paths is not None else None,
            model,
            HeadTokens.from_array(tokens[1], tokens[0], len(pick)) if tokens is not None else None,
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
    backend: str = "torch",
    head_tokens: bool | None = None,
) -> Gallery:
    """Embed ``images`` (a folder or a dataset) with ``model`` (a folder, run, Hub id or model) in this process;
    ``backend="onnx"`` embeds through ONNX Runtime (the folder's ``onnx/model.onnx``). With a model that has a
    re-ranker, the same backbone pass also gives each image's head tokens, stored for re-ranking (see
    :func:`tokens_to_store` for ``head_tokens``)."""
    store = tokens_to_store(model, head_tokens, backend)
    embedder, processor = load_embedder(model, image_processor, backend=backend)
    records = as_records(images, image_column, label_column, id_column)
    result = embed_images(
        embedder, processor, records.sources, batch_size, device, progress,
        image_column=records.image_column, num_workers=num_workers,
        forward=embeddings_and_reranker_tokens(store[0]) if store else pooler_output,
    )  # fmt: skip
    tokens = (store[0], result.extras["tokens"]) if store else None
    return Gallery.from_rows(records, result.embeddings, result.kept, model_reference(embedder), tokens)


def _save_shard(
    directory: Path, rank: int, embeddings: np.ndarray, rows: np.ndarray, skipped: list[str], tokens: Any = None
) -> None:
    """Write one process's shard atomically (the JSON last: it marks the shard complete)."""
    tensors = {"embeddings": np.ascontiguousarray(embeddings, dtype=np.float32), "rows": rows.astype(np.int64)}
    if tokens is not None:
        tensors["tokens"] = np.ascontiguousarray(tokens, dtype=np.float16)
    write_atomic(directory / f"shard-{rank:05d}.safetensors", lambda path: save_file(tensors, str(path)))
    write_atomic(
        directory / f"shard-{rank:05d}.json", json.dumps({"rank": rank, "count": len(rows), "skipped": skipped})
    )


def _merge_shards(directory: Path, world: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Concatenate all shards and restore the original row order (and the head tokens', when stored)."""
    embeddings, rows, tokens = [], [], []
    for rank in range(world):
        shard = directory / f"shard-{rank:05d}.safetensors"
        if not shard.is_file() or not (directory / f"shard-{rank:05d}.json").is_file():
            raise RuntimeError(f"shard of process {rank} is missing ({shard}): that process did not finish.")
        tensors = load_file(str(shard))
        embeddings.append(tensors["embeddings"])
        rows.append(tensors["rows"])
        if "tokens" in tensors and tensors["tokens"].size:
            tokens.append(tensors["tokens"])
    all_rows = np.concatenate(rows)
    nonempty = [e for e in embeddings if e.size]
    if not nonempty:
        raise ValueError("no image could be decoded in any process.")
    dim = nonempty[0].shape[1]
    stacked = np.concatenate([e.reshape(-1, dim) for e in embeddings])
    order = np.argsort(all_rows, kind="stable")
    return stacked[order], all_rows[order], np.concatenate(tokens)[order] if tokens else None


def embed_gallery_distributed(
    model: Any,
    images: Any,
    shards: Path,
    accelerator: Any,
    **options: Any,
) -> tuple[Gallery | None, int]:
    """Embed ``images`` with every process of ``accelerator``; return ``(gallery, item count)`` on the main
    process and ``(None, item count)`` on the others. ``options`` are :func:`embed_gallery`'s (``batch_size``,
    ``progress``, ``num_workers``, ``image_column``, ``label_column``, ``id_column``, ``backend``,
    ``head_tokens``), with the same defaults; the device is the accelerator's.

    Each process embeds every ``num_processes``-th row starting at its ``process_index`` and writes its shard to
    ``shards`` (a folder every process sees); the main process merges them in the original order and removes
    ``shards``. All processes return after the merge.
    """
    refused = {"device", "image_processor"}.intersection(options)
    if refused:
        raise TypeError(f"embed_gallery_distributed() got unexpected keyword argument(s) {sorted(refused)}")
    bound = inspect.signature(embed_gallery).bind(model, images, **options)  # embed_gallery's checks and defaults
    bound.apply_defaults()
    o = bound.arguments
    rank, world = accelerator.process_index, accelerator.num_processes
    records = as_records(images, o["image_column"], o["label_column"], o["id_column"])  # same order everywhere
    store = tokens_to_store(model, o["head_tokens"], o["backend"])
    embedder, processor = load_embedder(model, backend=o["backend"])
    if accelerator.is_main_process:
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir(parents=True)
    accelerator.wait_for_everyone()
    mine = np.arange(rank, len(records), world, dtype=np.int64)
    if len(mine):
        result = embed_images(
            embedder, processor, records.subset(mine), o["batch_size"], accelerator.device,
            o["progress"] and accelerator.is_main_process, image_column=records.image_column,
            num_workers=o["num_workers"], allow_empty=True, desc=f"Embedding images (process {rank}/{world})",
            forward=embeddings_and_reranker_tokens(store[0]) if store else pooler_output,
        )  # fmt: skip
        tokens = result.extras.get("tokens") if store else None
        _save_shard(shards, rank, result.embeddings, mine[result.kept], result.skipped.files, tokens)
    else:
        _save_shard(shards, rank, np.zeros((0, 0), np.float32), mine, [])
    accelerator.wait_for_everyone()
    gallery = None
    if accelerator.is_main_process:
        embeddings, rows, tokens = _merge_shards(shards, world)
        stored = (store[0], tokens) if store and tokens is not None else None
        gallery = Gallery.from_rows(records, embeddings, rows, model_reference(embedder), stored)
        shutil.rmtree(shards, ignore_errors=True)
    accelerator.wait_for_everyone()
    return gallery, len(records)
