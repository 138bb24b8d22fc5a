"""What :class:`CrossMetricReranker`'s ``predict`` and ``rank`` accept, turned into tensors.

An item is either an image (a PIL image, or a path to an image file), which the re-ranker embeds with its embedder
(one backbone pass gives the embedding and the head's tokens), or precomputed features (:class:`RerankFeatures`, or
an ``(embedding, tokens)`` pair of arrays): what an index stores for its gallery, so that re-ranking K stored
candidates costs no backbone pass at all. Items of both kinds may be mixed; the order is kept.

Also where the embedder of a loaded re-ranker lives: the export folder that holds ``reranker/`` (its parent folder
locally, the repo root for a Hub id loaded with ``subfolder="reranker"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import torch


class RerankFeatures(NamedTuple):
    """Precomputed re-ranker inputs of one item (``embeddings``: D, ``tokens``: T×C) or of N items (N×D, N×T×C).

    ``embeddings`` are the embedder's L2-normalised embeddings; ``tokens`` the head's tokens of the same backbone
    pass (:func:`embed_with_tokens`), in any float dtype (an index stores them in float16).
    """

    embeddings: Any
    tokens: Any


def _is_array(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def is_features(item: Any) -> bool:
    """Whether ``item`` is precomputed features (not an image or a path)."""
    if isinstance(item, RerankFeatures):
        return True
    return isinstance(item, (tuple, list)) and len(item) == 2 and all(_is_array(value) for value in item)


def features_tensors(item: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N×D, N×T×C)`` float32 tensors of one item's or N items' features; ``ValueError`` on other shapes."""
    embeddings, tokens = (torch.as_tensor(np.asarray(v) if not _is_array(v) else v) for v in item)
    if embeddings.dim() == 1 and tokens.dim() == 2:
        embeddings, tokens = embeddings[None], tokens[None]
    if embeddings.dim() != 2 or tokens.dim() != 3 or len(embeddings) != len(tokens):
        raise ValueError(
            f"features must be (embedding D, tokens T×C) or (embeddings N×D, tokens N×T×C); got shapes "
            f"{tuple(embeddings.shape)} and {tuple(tokens.shape)}."
        )
    return embeddings.float(), tokens.float()


def open_image(item: Any) -> Any:
    """An RGB PIL image from a PIL image or an image file path; a clear error for anything else."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"image {os.fspath(item)!r}: no such file.")
        with Image.open(path) as image:
            return image.convert("RGB")
    raise TypeError(
        f"a re-ranker input must be a PIL image, an image path, or precomputed features (RerankFeatures(embedding, "
        f"tokens)); got {type(item).__name__}."
    )


def gather_inputs(
    items: Sequence[Any],
    encode: Callable[[list[Any]], tuple[torch.Tensor, torch.Tensor]],
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (N×D) and tokens (N×T×C) of ``items`` in order: features taken as they are, images embedded by
    ``encode`` (a list of RGB images -> embeddings, tokens) ``batch_size`` at a time."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    embeddings: list[torch.Tensor | None] = [None] * len(items)
    tokens: list[torch.Tensor | None] = [None] * len(items)
    images = []
    for position, item in enumerate(items):
        if is_features(item):
            embeddings[position], tokens[position] = (t[0] for t in features_tensors(item))
        else:
            images.append(position)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        chunk_embeddings, chunk_tokens = encode([open_image(items[p]) for p in chunk])
        for row, position in enumerate(chunk):
            embeddings[position], tokens[position] = chunk_embeddings[row].float(), chunk_tokens[row].float()
    shapes = {tuple(t.shape) for t in tokens}  # type: ignore[union-attr]
    if len(shapes) > 1:
        raise ValueError(f"the items' tokens have different shapes {sorted(shapes)}: compute them with one model.")
    return torch.stack(embeddings), torch.stack(tokens)  # type: ignore[arg-type]


def embedder_location(name_or_path: str | os.PathLike, subfolder: str | None) -> tuple[str, str | None] | None:
    """``(path or repo id, subfolder)`` of the embedder next to a re-ranker loaded from ``name_or_path``.

    A re-ranker loaded with ``subfolder="reranker"`` has its embedder at ``subfolder``'s parent in the same folder or
    repo; one loaded from a local ``EXPORT/reranker`` folder at ``EXPORT``. None when it cannot be told (a re-ranker at
    the root of a Hub repo): pass the embedder explicitly then.
    """
    if subfolder:
        parent = str(PurePosixPath(subfolder).parent)
        return os.fspath(name_or_path), None if parent in ("", ".") else parent
    local = Path(os.fspath(name_or_path)).expanduser()
    if local.is_dir() and (local.resolve().parent / "config.json").is_file():
        return str(local.resolve().parent), None
    return None
