"""The one embedding loop: a stream of images through a model in batches, unreadable images skipped and counted.

:func:`embed_images` takes paths, PIL images, bytes, ``datasets`` ``{"bytes", "path"}`` records or a
``datasets.Dataset``, decodes each one robustly (:func:`~crossmetric.data.image_loading.load_rgb_image`) in the
collate function of a ``DataLoader`` (``num_workers > 0`` decodes in worker processes), preprocesses the decoded
ones, runs the model under ``torch.no_grad`` in eval mode (its mode is restored afterwards) and says which inputs
were kept, so that ids, labels and paths stay aligned with the embeddings. Every caller goes through it: dataset
splits (the evaluator, hence ``crossmetric evaluate`` and the trainer's validation; the embedding layer's PCA
start), image files and datasets (``crossmetric index build``, ``search``), export's ONNX check and the re-ranking
probe.

What runs per batch is a ``forward(model, pixel_values)`` that returns named outputs: ``"embeddings"`` (required),
and any other, e.g. the head's ``"tokens"`` (:func:`embeddings_and_head_tokens`: one backbone pass gives both); each is
concatenated over the kept images (``EmbeddedImages.extras``). The preprocessing is the model's image processor
(exported folders) or :class:`EvalTransform` (timm's evaluation transform, which dataset splits are embedded with).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.image_loading import SkippedImages, describe_source, load_rgb_image
from ..data.transforms import build_transform
from ..modeling.reranking_crossmetric import embed_with_tokens
from ..utils.fault_points import fault_point

logger = logging.getLogger(__name__)

Outputs = dict[str, "torch.Tensor | np.ndarray"]
Forward = Callable[[Any, torch.Tensor], Outputs]


def pooler_output(model: Any, pixel_values: torch.Tensor) -> Outputs:
    """The L2-normalised embedding (``pooler_output``) of an embedder, a model loaded by reference or ONNX Runtime."""
    return {"embeddings": model(pixel_values=pixel_values).pooler_output}


def pooled_features(model: Any, pixel_values: torch.Tensor) -> Outputs:
    """The backbone's pooled features (before the embedding layer) of a ``CrossMetricModel``."""
    return {"embeddings": model.pool(*model.forward_tokens(pixel_values))}


def embeddings_and_head_tokens(model: Any, pixel_values: torch.Tensor) -> Outputs:
    """What the head of a ``CrossMetricForMetricLearning`` reads, from one backbone pass: the embeddings and the
    head's tokens (B×T×C')."""
    _, embeddings, tokens, _ = model.forward_head_inputs(pixel_values)
    return {"embeddings": embeddings, "tokens": tokens}


def embeddings_and_reranker_tokens(token_stage: str | None) -> Forward:
    """The forward that gives, from one backbone pass of an exported embedder (``CrossMetricModel``), its embeddings
    and the tokens its re-ranker reads (``token_stage``: the re-ranker config's; ``embed_with_tokens``)."""

    def forward(model: Any, pixel_values: torch.Tensor) -> Outputs:
        _, embeddings, tokens, _ = embed_with_tokens(model, pixel_values, token_stage)
        return {"embeddings": embeddings, "tokens": tokens}

    return forward


class EmbeddedImages(NamedTuple):
    """What :func:`embed_images` returns.

    Attributes:
        embeddings: float32 array, one row per *decoded* image (``len(kept)`` × D): the forward's ``"embeddings"``.
        kept: int64 positions, in the input, of the images that were decoded (row i of ``embeddings`` is input
            ``kept[i]``).
        skipped: the images that could not be decoded, with the reason for each.
        extras: the forward's other outputs, row-aligned with ``embeddings`` (e.g. ``"tokens"``).
    """

    embeddings: np.ndarray
    kept: np.ndarray
    skipped: SkippedImages
    extras: dict[str, np.ndarray] = {}


class EvalTransform:
    """timm's evaluation transform of a model's ``preprocessing`` (resize, centre crop), over a list of images: how
    dataset splits are embedded (the trainer's validation and test, ``crossmetric evaluate``)."""

    def __init__(self, preprocessing: dict[str, Any]) -> None:
        self.transform = build_transform(preprocessing, train=False)

    def __call__(self, images: list[Any]) -> torch.Tensor:
        return torch.stack([self.transform(image) for image in images])


class _ImageProcessor:
    """An image processor (``AutoImageProcessor``) over a list of images."""

    def __init__(self, image_processor: Any) -> None:
        self.image_processor = image_processor

    def __call__(self, images: list[Any]) -> torch.Tensor:
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]


def embedding_fingerprint(model: Any) -> str | None:
    """The sha256 of the final embedding layer's weights (cheap, and changes whenever the model is trained further),
    so that a search can warn when an index is used with another model; ONNX exports record it too."""
    layer = getattr(model, "embedding", None)
    if not isinstance(layer, torch.nn.Linear):
        return None
    digest = hashlib.sha256()
    for tensor in (layer.weight, layer.bias):
        if tensor is not None:
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_reference(model: Any) -> dict[str, Any]:
    """What an index records about the model that built it: name/path, embedding size, a weight fingerprint.

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
    fingerprint = embedding_fingerprint(model)
    if fingerprint is not None:
        reference["fingerprint"] = fingerprint
    return reference


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

    def __getitems__(self, indices: list[int]) -> list[tuple[int, Any]]:
        if self.image_column is None:
            return [(index, self.sources[index]) for index in indices]
        return list(zip(indices, self.sources[list(indices)][self.image_column]))  # one Arrow read per batch


class _DecodeAndProcess:
    """DataLoader collate function: decode robustly, preprocess the decoded images, report the skipped ones."""

    def __init__(self, preprocess: Callable[[list[Any]], torch.Tensor], skip_unreadable: bool) -> None:
        self.preprocess = preprocess
        self.skip_unreadable = skip_unreadable

    def __call__(self, batch: list[tuple[int, Any]]) -> tuple[torch.Tensor | None, list[int], SkippedImages]:
        skipped = SkippedImages()
        images, kept = [], []
        for index, source in batch:
            image = load_rgb_image(source, skipped)
            if image is not None:
                images.append(image)
                kept.append(index)
            elif not self.skip_unreadable:
                raise ValueError(
                    f"Cannot decode image {describe_source(source)} ({skipped.reasons[-1]}). Drop unreadable images "
                    "first with crossmetric.data.image_loading.filter_unreadable(dataset)."
                )
        if not images:
            return None, kept, skipped
        return self.preprocess(images), kept, skipped


def _as_sources(images: Any, image_column: str) -> tuple[Any, str | None]:
    """Turn the accepted inputs into an indexable collection of raw sources (datasets images left undecoded)."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

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


def _model_device(model: Any) -> torch.device:
    parameter = next(model.parameters(), None) if hasattr(model, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32)


@torch.no_grad()
def embed_images(
    model: Any,
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
    forward: Forward = pooler_output,
    skip_unreadable: bool = True,
    channels_last: bool = False,
) -> EmbeddedImages:
    """Embed ``images`` with ``model`` in batches; unreadable images are skipped and counted, not fatal.

    Args:
        model: the embedder (``CrossMetricModel``, an ``OnnxEmbedder``, or any model ``forward`` can call; ``None``
            when ``forward`` needs none). A torch module is moved to ``device`` and run in eval mode, then put back in
            the mode it was in.
        image_processor: its preprocessing: an image processor (``AutoImageProcessor.from_pretrained(model_dir)``),
            or an :class:`EvalTransform`.
        images: a sequence of paths / PIL images / bytes / ``{"bytes", "path"}`` records, or a
            ``datasets.Dataset`` whose ``image_column`` holds the images.
        batch_size: images per forward pass.
        device: where to run; default the model's device.
        progress: show a tqdm progress bar (images done / total).
        num_workers: DataLoader worker processes for decoding and preprocessing (0: in this process).
        allow_empty: return an empty (0 × 0) result instead of raising when no image could be decoded (a
            process's shard in a distributed build may legitimately hold only broken files).
        forward: what runs on each batch: :func:`pooler_output` (default), :func:`pooled_features`,
            :func:`embeddings_and_head_tokens`, or any function of ``(model, pixel_values)`` returning named outputs.
        skip_unreadable: ``False`` raises ``ValueError`` at the first unreadable image instead (evaluation splits,
            whose rows must all be there).
        channels_last: run a torch module and its inputs in channels-last memory format (faster CPU convolutions).

    Returns:
        :class:`EmbeddedImages` ``(embeddings, kept, skipped, extras)``; a warning summarises the skipped files.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    sources, column = _as_sources(images, image_column)
    total = len(sources)
    if total == 0:
        raise ValueError("embed_images got no images.")
    device = torch.device(device) if device is not None else _model_device(model)
    preprocess = image_processor if isinstance(image_processor, EvalTransform) else _ImageProcessor(image_processor)
    loader = DataLoader(
        _Sources(sources, column),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_DecodeAndProcess(preprocess, skip_unreadable),
        generator=torch.Generator(),  # creating the iterator must not draw from the global RNG (exact resume)
    )
    was_training = isinstance(model, torch.nn.Module) and model.training
    if model is not None:
        model = model.to(device).eval()
    if channels_last and isinstance(model, torch.nn.Module):
        model.to(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    chunks: dict[str, list[np.ndarray]] = {}
    kept, skipped = [], SkippedImages()
    try:
        with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True, leave=False) as bar:
            for pixel_values, batch_kept, batch_skipped in loader:
                skipped.files += batch_skipped.files
                skipped.reasons += batch_skipped.reasons
                if pixel_values is not None:
                    outputs = forward(model, pixel_values.to(device).contiguous(memory_format=memory_format))
                    for name, value in outputs.items():
                        chunks.setdefault(name, []).append(_numpy(value))
                    kept += batch_kept
                bar.update(len(batch_kept) + batch_skipped.count)
                fault_point("embedding")  # test hook (tests/test_faults.py): a no-op unless CROSSMETRIC_TEST_PAUSE
    finally:
        if was_training:
            model.train()
    if skipped.count:
        logger.warning(skipped.summary())
    if not kept:
        if allow_empty:
            return EmbeddedImages(np.zeros((0, 0), np.float32), np.zeros(0, np.int64), skipped, {})
        raise ValueError(f"None of the {total} images could be decoded. {skipped.summary()}")
    outputs = {name: np.ascontiguousarray(np.concatenate(parts), dtype=np.float32) for name, parts in chunks.items()}
    embeddings = outputs.pop("embeddings")
    return EmbeddedImages(embeddings, np.asarray(kept, dtype=np.int64), skipped, outputs)
