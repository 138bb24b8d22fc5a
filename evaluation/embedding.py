"""Batched embedding of images (paths, PIL images, bytes, a ``datasets.Dataset``) with an exported embedder.

:func:`embed_images` runs the model in eval mode under ``torch.no_grad`` batch by batch, with a tqdm progress
bar, decoding every image through :func:`~crossmetric.data.image_loading.load_rgb_image`: a file that
cannot be decoded is skipped with a warning and counted instead of stopping the run, and the result says
which inputs were kept (``kept``), so that ids, labels and paths stay aligned with the embeddings.

Decoding and preprocessing run in a ``torch.utils.data.DataLoader`` collate function so that
``num_workers > 0`` decodes in parallel worker processes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.image_loading import SkippedImages, load_rgb_image

logger = logging.getLogger(__name__)


class EmbeddedImages(NamedTuple):
    """What :func:`embed_images` returns.

    Attributes:
        embeddings: float32 array, one L2-normalised row per *decoded* image (``len(kept)`` × D).
        kept: int64 positions, in the input, of the images that were decoded (row i of ``embeddings`` is input
            ``kept[i]``).
        skipped: the images that could not be decoded, with the reason for each.
    """

    embeddings: np.ndarray
    kept: np.ndarray
    skipped: SkippedImages


def model_reference(model: torch.nn.Module) -> dict[str, Any]:
    """What an index records about the model that built it: name/path, embedding size, a weight fingerprint.

    The fingerprint is the sha256 of the final embedding layer's weights (cheap, and changes whenever the
    model is trained further), so that a search can warn when an index is used with another model.
    An ONNX Runtime embedder gives its own (the same fingerprint, recorded at export).
    """
    if hasattr(model, "model_reference"):
        return model.model_reference()
    config = getattr(model, "config", None)
    reference: dict[str, Any] = {
        "name_or_path": str(getattr(model, "name_or_path", "") or getattr(config, "_name_or_path", "") or ""),
        "model_type": getattr(config, "model_type", None),
        "embedding_dim": getattr(config, "embedding_dim", None),
    }
    layer = getattr(model, "embedding", None)
    if isinstance(layer, torch.nn.Linear):
        digest = hashlib.sha256()
        for tensor in (layer.weight, layer.bias):
            if tensor is not None:
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        reference["fingerprint"] = digest.hexdigest()
    return reference


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden files and folders skipped), sorted by relative path.

    An image file is one whose extension Pillow can open. Symlinked folders are not followed (no cycles).
    """
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"images folder {str(root)!r} does not exist or is not a folder.")
    extensions = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in extensions:
                found.append(Path(directory, name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


class _Sources(torch.utils.data.Dataset):
    """Index → raw image source (path, PIL image, bytes or a datasets ``{"bytes", "path"}`` record)."""

    def __init__(self, sources: Any, image_column: str | None) -> None:
        self.sources = sources
        self.image_column = image_column

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        item = self.sources[index]
        return index, item[self.image_column] if self.image_column is not None else item


class _DecodeAndProcess:
    """DataLoader collate function: decode robustly, preprocess the decoded images, report the skipped ones."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, batch: list[tuple[int, Any]]) -> tuple[torch.Tensor | None, list[int], SkippedImages]:
        skipped = SkippedImages()
        images, kept = [], []
        for index, source in batch:
            image = load_rgb_image(source, skipped)
            if image is not None:
                images.append(image)
                kept.append(index)
        if not images:
            return None, kept, skipped
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return pixel_values, kept, skipped


def _as_sources(images: Any, image_column: str) -> tuple[Any, str | None]:
    """Turn the accepted inputs into an indexable collection of raw sources (datasets images left undecoded)."""
    try:
        from datasets import Dataset
        from datasets import Image as ImageFeature
    except ImportError:  # pragma: no cover - datasets is a dependency
        Dataset = ()  # type: ignore[assignment]
    if isinstance(images, Dataset):
        if image_column not in images.column_names:
            raise ValueError(f"dataset has no column {image_column!r}; its columns: {images.column_names}.")
        if isinstance(images.features[image_column], ImageFeature):
            # Undecoded {"bytes", "path"} records: datasets' own decoding raises on a broken file mid-run.
            images = images.cast_column(image_column, ImageFeature(decode=False))
        return images.select_columns([image_column]), image_column
    if isinstance(images, (str, os.PathLike)):
        raise TypeError(
            f"embed_images got a single path {os.fspath(images)!r}; pass a list of images, or use "
            "list_image_files(folder) for a folder."
        )
    if not isinstance(images, Sequence):
        images = list(images)
    return images, None


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def embed_images(
    model: torch.nn.Module,
    image_processor: Any,
    images: Any,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = True,
    *,
    image_column: str = "image",
    num_workers: int = 0,
    desc: str = "Embedding images",
    allow_empty: bool = False,
) -> EmbeddedImages:
    """Embed ``images`` with ``model`` in batches; unreadable images are skipped, not fatal.

    Args:
        model: the embedder (``CrossMetricModel``, or any model whose output has ``pooler_output``).
        image_processor: its preprocessing (``AutoImageProcessor.from_pretrained(model_dir)``).
        images: a sequence of paths / PIL images / bytes / ``{"bytes", "path"}`` records, or a
            ``datasets.Dataset`` whose ``image_column`` holds the images.
        batch_size: images per forward pass.
        device: where to run; default the model's device. The model is moved there and put in eval mode.
        progress: show a tqdm progress bar (images done / total).
        num_workers: DataLoader worker processes for decoding and preprocessing (0: in this process).
        allow_empty: return an empty (0 × 0) result instead of raising when no image could be decoded (a
            process's shard in a distributed build may legitimately hold only broken files).

    Returns:
        :class:`EmbeddedImages` ``(embeddings, kept, skipped)``; a warning summarises the skipped files.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    sources, column = _as_sources(images, image_column)
    total = len(sources)
    if total == 0:
        raise ValueError("embed_images got no images.")
    device = torch.device(device) if device is not None else _model_device(model)
    model.to(device).eval()
    loader = DataLoader(
        _Sources(sources, column),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_DecodeAndProcess(image_processor),
    )
    chunks, kept, skipped = [], [], SkippedImages()
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for pixel_values, batch_kept, batch_skipped in loader:
            skipped.files += batch_skipped.files
            skipped.reasons += batch_skipped.reasons
            if pixel_values is not None:
                output = model(pixel_values=pixel_values.to(device))
                chunks.append(output.pooler_output.float().cpu().numpy())
                kept += batch_kept
            bar.update(len(batch_kept) + batch_skipped.count)
    if skipped.count:
        logger.warning(skipped.summary())
    if not chunks:
        if allow_empty:
            return EmbeddedImages(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), skipped)
        raise ValueError(f"None of the {total} images could be decoded. {skipped.summary()}")
    embeddings = np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
    return EmbeddedImages(embeddings, np.asarray(kept, dtype=np.int64), skipped)
