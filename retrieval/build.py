"""Build and save an :class:`~crossmetric.retrieval.index.EmbeddingIndex` from images (``crossmetric index build``).

Two ways:

- :func:`build_index`: embed in this process, in memory, and return the index (``EmbeddingIndex.from_folder`` and
  ``from_dataset`` are this);
- :func:`build_index_sharded`: the command's build. The gallery is cut into shards of ``shard_size`` images
  (:mod:`.shards`); each finished shard is written, with a completion marker, into a work folder beside the output
  (``.<name>.build/<fingerprint>/``). Running the same build again continues from the first unfinished shard, so a
  kill loses at most the shard being embedded. Under ``accelerate launch`` process ``r`` of ``w`` embeds the shards
  ``i`` with ``i % w == r``; the main process then assembles the index from the shard files, one shard at a time,
  and removes the work folder once the index is saved (atomically, as every save).

:mod:`.gallery` embeds and :class:`EmbeddingIndex` stores; neither imports the other, this module joins them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from ..inference.embedding import Forward, embed_images, embeddings_and_reranker_tokens, model_reference, pooler_output
from ..inference.loading import load_embedder
from ..utils.fault_points import fault_point
from .builder import IndexBuilder
from .compatibility import describe_model, same_model
from .gallery import Gallery, GallerySource, ImageRecords, as_records, embed_gallery, split_options, tokens_to_store
from .index import EmbeddingIndex
from .shards import DEFAULT_SHARD_SIZE, ShardFolder, ShardPlan, build_fingerprint, work_root

logger = logging.getLogger(__name__)


def build_index(model: Any, images: Any, *, kind: str = "exact", **options: Any) -> EmbeddingIndex:
    """Embed ``images`` (a folder or a dataset) with ``model`` (a folder, run, Hub id or model) in this process.

    ``options``: the keywords of :func:`~crossmetric.retrieval.gallery.embed_gallery` (``batch_size``,
    ``device``, ...) and of the index constructor (``ef_search``, ``nprobe``, ...).
    """
    embed_options, index_options = split_options(options)
    return EmbeddingIndex.from_gallery(embed_gallery(model, images, **embed_options), kind, **index_options)


class _Processes:
    """This process's place among the build's processes: an ``accelerate`` run's, or this process alone."""

    def __init__(self, accelerator: Any | None, device: Any) -> None:
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.is_main = self.rank == 0
        self.device = accelerator.device if accelerator is not None else device

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def _counting(forward: Forward, bar: tqdm) -> Forward:
    """``forward`` that also advances the build's one progress bar by each batch's images."""

    def run(model: Any, pixel_values: Any) -> dict[str, Any]:
        outputs = forward(model, pixel_values)
        bar.update(len(pixel_values))
        return outputs

    return run


def _items(records: ImageRecords, start: int, kept: np.ndarray) -> pa.Table:
    """The Arrow table of the kept rows of one shard: gallery ``row``, ``id``, ``label``, ``path``, metadata."""
    pick = kept.tolist()
    columns: dict[str, Any] = {
        "row": pa.array(np.asarray(kept, dtype=np.int64) + start, pa.int64()),
        "id": pa.array([records.ids[i] for i in pick], pa.string()),
    }
    if records.labels is not None:
        columns["label"] = pa.array([records.labels[i] for i in pick], pa.string())
    if records.paths is not None:
        columns["path"] = pa.array([records.paths[i] for i in pick], pa.string())
    for name, values in (records.metadata or {}).items():
        columns[name] = pa.array([values[i] for i in pick])
    return pa.table(columns)


def _assemble(
    folder: ShardFolder, output_dir: str | os.PathLike, kind: str, model: dict[str, Any], token_stage: Any,
    progress: bool, **options: Any,
) -> Any:  # fmt: skip
    """The index over every shard of ``folder``, in gallery order, written to ``output_dir`` shard after shard by
    :class:`~.builder.IndexBuilder` (each shard's arrays are memory-mapped: no process holds the whole gallery)."""
    with IndexBuilder(
        output_dir, kind=kind, model=model, token_stage=token_stage, progress=progress, **options
    ) as builder:  # fmt: skip
        for shard in folder.shards():
            items = shard.items
            if not items.num_rows:
                continue  # every image of the shard was unreadable
            values = {name: items.column(name).to_pylist() for name in items.column_names if name != "row"}
            metadata = {name: column for name, column in values.items() if name not in ("id", "label", "path")}
            builder.append(
                shard.embeddings, values["id"], values.get("label"), values.get("path"), metadata or None,
                head_tokens=shard.tokens,
            )  # fmt: skip
        if builder.count == 0:
            raise ValueError(f"none of the {folder.plan.count} images could be decoded.")
        return EmbeddingIndex.load(builder.finish())


def build_index_sharded(
    model: Any,
    images: Any,
    output_dir: str | os.PathLike,
    *,
    kind: str = "exact",
    shard_size: int = DEFAULT_SHARD_SIZE,
    accelerator: Any | None = None,
    device: Any = None,
    batch_size: int = 64,
    progress: bool = True,
    num_workers: int = 0,
    image_column: str = "image",
    label_column: str | None = "label",
    id_column: str | None = None,
    metadata_columns: Sequence[str] | None = None,
    backend: str = "torch",
    head_tokens: bool | None = None,
    on_shard: Callable[[int], None] | None = None,
    **index_options: Any,
) -> Any | None:
    """Embed ``images`` shard by shard into the work folder beside ``output_dir``, resuming a build of the same
    inputs, then assemble and save the index to ``output_dir``; return it on the main process, None on the others.

    Args:
        model: an exported model folder, run folder or Hub id.
        images: an image folder or a ``datasets.Dataset``.
        output_dir: the index folder (replaced as a whole, atomically).
        kind: the index kind; ``index_options`` are the index constructor's (``nprobe``, ``ef_search``, ...).
        shard_size: images per shard (:data:`~.shards.DEFAULT_SHARD_SIZE`): the most work a kill can lose.
        accelerator: an ``accelerate.Accelerator`` whose processes share the shards (shard ``i`` to process
            ``i % num_processes``); None: this process alone, on ``device``.
        on_shard: called with each shard's number once it is written (tests, progress reports).
        Other keywords: as :func:`~crossmetric.retrieval.gallery.embed_gallery`.

    The other processes return once every shard is written, without waiting for the assembly (which may take long
    for a large ``ivfpq`` index: a collective wait would time out).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    processes = _Processes(accelerator, device)
    source = GallerySource(images, image_column, label_column, id_column, metadata_columns)  # same order everywhere
    plan = ShardPlan(len(source), int(shard_size))
    store = tokens_to_store(model, head_tokens, backend)
    embedder, processor = load_embedder(model, backend=backend)
    reference = model_reference(embedder)
    record_options = {
        "backend": backend, "image_column": image_column, "label_column": label_column, "id_column": id_column,
        "metadata_columns": list(source.metadata_columns), "token_stage": store,
    }  # fmt: skip
    fingerprint = build_fingerprint(reference, source.fingerprint(), record_options, plan.shard_size)
    folder = ShardFolder(work_root(output_dir), fingerprint, plan)
    if processes.is_main:
        folder.prepare()
    processes.wait()
    mine = plan.owned(processes.rank, processes.world)
    todo = [shard for shard in mine if not folder.is_done(shard)]
    done = folder.done() if processes.is_main else []
    if done:
        logger.info("Resuming the build in %s: %d of %d shards done.", folder.directory, len(done), plan.num_shards)
    forward = embeddings_and_reranker_tokens(store[0]) if store else pooler_output
    total = sum(stop - start for start, stop in map(plan.rows, todo))
    where = f" (process {processes.rank}/{processes.world})" if processes.world > 1 else ""
    started = time.perf_counter()
    with tqdm(
        total=total, desc=f"Embedding images{where}", unit="img", disable=not (progress and processes.is_main),
        dynamic_ncols=True, smoothing=0.1,
    ) as bar:  # fmt: skip
        for shard in todo:
            start, stop = plan.rows(shard)
            records = source.records(start, stop)
            done_before = bar.n
            result = embed_images(
                embedder, processor, records.sources, batch_size, processes.device, False,
                image_column=records.image_column, num_workers=num_workers, allow_empty=True,
                forward=_counting(forward, bar),
            )  # fmt: skip
            bar.update(stop - start - (bar.n - done_before))  # the skipped images count as done
            tokens = result.extras.get("tokens") if store and len(result.kept) else None
            folder.write(shard, result.embeddings, _items(records, start, result.kept), tokens, result.skipped.files)
            fault_point("build_shard")  # test hook: a kill here must lose nothing (tests/test_index_build.py)
            if on_shard is not None:
                on_shard(shard)
    if todo:
        seconds = time.perf_counter() - started
        logger.info(
            "Embedded %d images in %.1f s (%.1f images/s)%s.", total, seconds, total / max(seconds, 1e-9), where
        )
    processes.wait()
    if not processes.is_main:
        return None
    index = _assemble(folder, output_dir, kind, reference, store[0] if store else None, progress, **index_options)
    folder.remove()
    logger.info("Saved %s (%d of %d images) to %s", index, len(index), plan.count, output_dir)
    return index


def build_index_distributed(
    model_dir: str | os.PathLike,
    folder_or_dataset: Any,
    output_dir: str | os.PathLike,
    *,
    kind: str = "exact",
    accelerator: Any | None = None,
    **options: Any,
) -> Any | None:
    """:func:`build_index_sharded` with every process of an ``accelerate launch`` run (an ``Accelerator`` is made
    when none is given, and its process group left at the end). Returns the index on the main process, None on the
    others."""
    from accelerate import Accelerator

    owns_accelerator = accelerator is None
    accelerator = accelerator or Accelerator()
    options.pop("device", None)  # each process uses its accelerator's device
    options.pop("image_processor", None)
    try:
        return build_index_sharded(
            model_dir, folder_or_dataset, output_dir, kind=kind, accelerator=accelerator, **options
        )
    finally:
        if owns_accelerator:  # leave the process group: gloo's threads abort the interpreter at exit otherwise
            accelerator.end_training()


def embed_for_index(
    index: Any,
    images: Any,
    model: Any = None,
    *,
    batch_size: int = 64,
    device: Any = None,
    progress: bool = True,
    num_workers: int = 0,
    image_column: str = "image",
    label_column: str | None = "label",
    id_column: str | None = None,
    metadata_columns: Sequence[str] | None = None,
    backend: str = "torch",
) -> Gallery:
    """Embed new images for ``index.add``: with ``model`` (default: the model ``index`` records), refused before
    any image is embedded when its weights are not those that built the index (the message names both). The head's
    tokens are embedded too when the index stores them for re-ranking (the model must then have its re-ranker)."""
    recorded = dict(getattr(index, "model", None) or {})
    source = model if model is not None else recorded.get("name_or_path")
    if not source:
        raise ValueError("the index records no model: pass --model, the model that built it.")
    if model is None and isinstance(source, str) and not Path(source).exists() and source.startswith((".", "/")):
        raise ValueError(f"the index was built with {source!r}, which is not found here: pass --model.")
    stored_tokens = index.head_tokens_info()
    store = tokens_to_store(source, True, backend) if stored_tokens else None
    embedder, processor = load_embedder(source, backend=backend)
    reference = model_reference(embedder)
    if not same_model(recorded, reference):
        raise ValueError(
            f"--model {describe_model(reference)} is not the model that built the index, {describe_model(recorded)}: "
            "embeddings of two models cannot be searched together; add with the index's model, or build a new index."
        )
    if stored_tokens and store[0] != stored_tokens.get("token_stage"):
        raise ValueError(
            f"the index stores head tokens of stage {stored_tokens.get('token_stage')!r}, the model's re-ranker reads "
            f"{store[0]!r}: add with the model that built the index."
        )
    records = as_records(images, image_column, label_column, id_column, metadata_columns)
    result = embed_images(
        embedder, processor, records.sources, batch_size, device, progress, image_column=records.image_column,
        num_workers=num_workers, forward=embeddings_and_reranker_tokens(store[0]) if store else pooler_output,
    )  # fmt: skip
    tokens = (store[0], result.extras["tokens"]) if store else None
    return Gallery.from_rows(records, result.embeddings, result.kept, reference, tokens)
