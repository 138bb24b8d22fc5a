"""Build a gallery into a Milvus collection, from one process or from every process of ``accelerate launch``.

No process gathers the gallery: every process lists the same items in the same order (``gallery.GallerySource``),
cuts them in chunks of ``chunk_size`` rows, embeds every ``num_processes``-th chunk from its ``process_index``, and
upserts each chunk straight into the collection as soon as it is embedded. The main process creates the collection
first (or opens an existing one after checking that it holds the same model's embeddings); the others wait for it,
then open it.

Resuming: a process that is killed leaves its upserted chunks in the collection and the rest missing. Running the
same command again redoes every shard; since rows are upserted by id, the items already there are replaced by
identical ones and the result holds every image exactly once, whichever processes died. (Building into an existing
collection is the same upsert: new ids are added, known ids replaced, other ids left as they are.)

With one process (no ``accelerate launch``) the same code runs with rank 0 of 1 and no process group.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from ..inference.embedding import embed_images, embeddings_and_reranker_tokens, model_reference, pooler_output
from ..inference.loading import load_embedder
from .gallery import GallerySource, tokens_to_store
from .milvus_index import MilvusIndex
from .milvus_schema import DEFAULT_INDEX_TYPE, column_type

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 1024  # images embedded, then upserted, at a time: what a killed process can lose


def build_milvus_index(
    model: Any,
    images: Any,
    uri: str,
    collection: str,
    *,
    token: str | None = None,
    index_type: str = DEFAULT_INDEX_TYPE,
    accelerator: Any | None = None,
    batch_size: int = 64,
    device: Any = None,
    progress: bool = True,
    num_workers: int = 0,
    image_column: str = "image",
    label_column: str | None = "label",
    id_column: str | None = None,
    metadata_columns: Sequence[str] | None = None,
    backend: str = "torch",
    head_tokens: bool | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[MilvusIndex, int]:
    """Embed ``images`` (a folder or a dataset) with ``model`` and upsert them into ``collection`` at ``uri``.

    The gallery is cut in chunks of ``chunk_size`` rows; chunk ``c`` is embedded and upserted by process
    ``c % num_processes`` of ``accelerator`` (an ``accelerate.Accelerator``, on its device), or all by this process
    on ``device`` without one. Returns ``(the index, the number of images this process upserted)`` on every process,
    after all have finished. The model's head tokens are stored for re-ranking when it has a re-ranker
    (``head_tokens``: as ``gallery.tokens_to_store``); ``metadata_columns`` (a dataset's) become filterable fields.
    """
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    source = GallerySource(images, image_column, label_column, id_column, metadata_columns)  # same order everywhere
    store = tokens_to_store(model, head_tokens, backend)
    embedder, processor = load_embedder(model, backend=backend)
    reference = model_reference(embedder)
    first = source.records(0, min(len(source), chunk_size))
    options = {
        "dim": int(embedder.config.embedding_dim), "model": reference, "token": token, "index_type": index_type,
        "metadata_columns": {name: column_type(values, name) for name, values in (first.metadata or {}).items()},
        "head_tokens": _tokens_info(embedder, processor, first, store[0]) if store is not None else None,
    }  # fmt: skip
    index = MilvusIndex.create(uri, collection, exist_ok=True, **options) if rank == 0 else None
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if index is None:  # the main process made it: open it, with the same checks
        index = MilvusIndex.create(uri, collection, exist_ok=True, **options)
    where = accelerator.device if accelerator is not None else device
    forward = embeddings_and_reranker_tokens(store[0]) if store else pooler_output
    mine = [start for number, start in enumerate(range(0, len(source), chunk_size)) if number % world == rank]
    total = sum(min(chunk_size, len(source) - start) for start in mine)
    upserted = 0
    bar = tqdm(total=total, desc=f"Embedding into Milvus (process {rank}/{world})", unit="img",
               disable=not (progress and rank == 0), dynamic_ncols=True)  # fmt: skip
    with bar:
        for start in mine:
            records = source.records(start, min(start + chunk_size, len(source)))
            result = embed_images(
                embedder, processor, records.sources, batch_size, where, False, image_column=records.image_column,
                num_workers=num_workers, allow_empty=True, forward=forward,
            )  # fmt: skip
            kept = result.kept.tolist()
            if kept:
                index.add(
                    result.embeddings,
                    [records.ids[i] for i in kept],
                    _pick(records.labels, kept),
                    _pick(records.paths, kept),
                    {name: _pick(values, kept) for name, values in (records.metadata or {}).items()},
                    head_tokens=result.extras.get("tokens") if store else None,
                    model=reference,
                )
            upserted += len(kept)
            bar.update(len(records))
    index.flush()  # seal this process's rows into indexed segments (see MilvusIndex.flush)
    logger.info("Process %d/%d upserted %d of its %d images into %r.", rank, world, upserted, total, collection)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return index, upserted


def _pick(values: list[Any] | None, rows: list[int]) -> list[Any] | None:
    return [values[i] for i in rows] if values is not None else None


def _tokens_info(embedder: Any, processor: Any, records: Any, token_stage: str | None) -> dict[str, Any]:
    """``{"shape": [T, C], "token_stage"}`` of the head tokens, from the first image of the gallery that decodes
    (the collection's field is created before any process has embedded its share)."""
    for row in range(min(len(records), 16)):
        result = embed_images(
            embedder, processor, [records.sources[row]] if isinstance(records.sources, list) else
            records.sources.select([row]), 1, None, False, image_column=records.image_column, allow_empty=True,
            forward=embeddings_and_reranker_tokens(token_stage),
        )  # fmt: skip
        if len(result.kept):
            return {"shape": [int(n) for n in result.extras["tokens"].shape[1:]], "token_stage": token_stage}
    raise ValueError("none of the gallery's first 16 images could be decoded: check --images.")
