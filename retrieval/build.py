"""Build and save an :class:`~crossmetric.retrieval.index.EmbeddingIndex` from images (``crossmetric index build``).

The two halves live apart so that they do not import each other: :mod:`.gallery` embeds images into arrays and
metadata, :class:`~crossmetric.retrieval.index.EmbeddingIndex` is constructed from them; this module joins them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .gallery import embed_gallery, embed_gallery_distributed, split_options
from .index import EmbeddingIndex

logger = logging.getLogger(__name__)


def build_index(model: Any, images: Any, *, kind: str = "exact", **options: Any) -> EmbeddingIndex:
    """Embed ``images`` (a folder or a dataset) with ``model`` (a folder, run, Hub id or model) in this process.

    ``options``: the keywords of :func:`~crossmetric.retrieval.gallery.embed_gallery` (``batch_size``,
    ``device``, ...) and of the index constructor (``ef_search``, ``nprobe``, ...).
    """
    embed_options, index_options = split_options(options)
    return EmbeddingIndex.from_gallery(embed_gallery(model, images, **embed_options), kind, **index_options)


def build_index_distributed(
    model_dir: str | os.PathLike,
    folder_or_dataset: Any,
    output_dir: str | os.PathLike,
    *,
    kind: str = "exact",
    accelerator: Any | None = None,
    **options: Any,
) -> EmbeddingIndex | None:
    """Build and save an index with every process of an ``accelerate launch`` run (or a single process).

    Each process embeds a share of the images (:func:`~crossmetric.retrieval.gallery.embed_gallery_distributed`);
    the main process builds the index and saves it to ``output_dir``. Returns the index on the main process and
    None on the others (all return after the index is saved). The shards are written next to ``output_dir``
    (``.<name>.shards/``), which must therefore be on a file system every process sees (always so on one
    machine; on several, a shared file system).
    """
    from accelerate import Accelerator

    owns_accelerator = accelerator is None
    accelerator = accelerator or Accelerator()
    output = Path(output_dir)
    embed_options, index_options = split_options(options)
    embed_options.pop("device", None)  # each process uses its accelerator's device
    embed_options.pop("image_processor", None)
    shards = output.parent / f".{output.name}.shards"
    gallery, total = embed_gallery_distributed(model_dir, folder_or_dataset, shards, accelerator, **embed_options)
    index = None
    if gallery is not None:
        index = EmbeddingIndex.from_gallery(gallery, kind, **index_options)
        index.save(output)
        logger.info("Saved %s (%d of %d images) to %s", index, len(index), total, output)
    accelerator.wait_for_everyone()
    if owns_accelerator:  # leave the process group: gloo's threads abort the interpreter at exit otherwise
        accelerator.end_training()
    return index
