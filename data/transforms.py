"""Image transforms for training and evaluation, built by timm from the model's preprocessing config.

The preprocessing (size, mean, std, interpolation, crop_pct) travels with the weights in the model
config, as in timm; :func:`build_transform` turns it into timm's standard pipelines (train:
RandomResizedCrop + horizontal flip; eval: resize + centre crop by ``crop_pct``) so that what the
model sees in training and in the exported image processor agree. :func:`attach_transform` applies
it lazily to a ``datasets`` split with robust decoding (see :mod:`.image_loading`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image
from timm.data import create_transform

from .image_loading import SkippedImages, describe_source, load_rgb_image

_REQUIRED_KEYS = ("image_size", "image_mean", "image_std")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


def _image_size(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, Sequence) and len(value) in (2, 3) and all(isinstance(v, int) for v in value):
        return tuple(value[-2:])  # (C, H, W) as timm writes it, or (H, W)
    raise ValueError(f"preprocessing['image_size'] must be an int or (height, width), got {value!r}.")


def build_transform(
    preprocessing: Mapping[str, Any],
    train: bool,
    *,
    hflip: float = 0.5,
    scale: tuple[float, float] = (0.16, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    color_jitter: float | tuple[float, ...] | None = None,
) -> Callable[[Image.Image], torch.Tensor]:
    """timm transform from the model config's ``preprocessing`` dict: PIL RGB image -> normalised tensor.

    ``preprocessing`` holds ``image_size`` (int or (h, w)), ``image_mean`` and ``image_std``
    (3-tuples), and optionally ``interpolation`` (default ``"bicubic"``) and ``crop_pct`` (default
    0.875, eval only). ``train=True`` gives RandomResizedCrop(``scale``, ``ratio``) + flip with
    probability ``hflip`` + optional colour jitter; ``train=False`` resizes to
    ``image_size / crop_pct`` and centre-crops ``image_size``.
    """
    missing = [key for key in _REQUIRED_KEYS if key not in preprocessing]
    if missing:
        raise ValueError(
            f"preprocessing is missing {missing}; expected keys {list(_REQUIRED_KEYS)} plus optional "
            f"'interpolation' and 'crop_pct' (got {sorted(preprocessing)})."
        )
    size = _image_size(preprocessing["image_size"])
    mean, std = tuple(preprocessing["image_mean"]), tuple(preprocessing["image_std"])
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"image_mean and image_std must have 3 values (RGB), got {mean} and {std}.")
    interpolation = preprocessing.get("interpolation", "bicubic")
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"preprocessing['interpolation']={interpolation!r}; expected one of {_INTERPOLATIONS}.")
    crop_pct = float(preprocessing.get("crop_pct", 0.875))
    if not 0 < crop_pct <= 1:
        raise ValueError(f"preprocessing['crop_pct'] must lie in (0, 1], got {crop_pct}.")
    if train:
        return create_transform(
            input_size=(3, *size),
            is_training=True,
            scale=tuple(scale),
            ratio=tuple(ratio),
            hflip=hflip,
            color_jitter=color_jitter,  # None: timm's default of 0.4 would silently add jitter
            interpolation=interpolation,
            mean=mean,
            std=std,
        )
    return create_transform(
        input_size=(3, *size), is_training=False, interpolation=interpolation, mean=mean, std=std, crop_pct=crop_pct
    )


def attach_transform(
    dataset_split: Dataset,
    transform: Callable[[Image.Image], torch.Tensor],
    *,
    image_column: str = "image",
    label_column: str = "label",
) -> Dataset:
    """The split, lazily yielding ``{"pixel_values": tensor, "labels": int}`` per example.

    Uses ``Dataset.with_transform``: nothing is rewritten, images are decoded (robustly, by
    :func:`.image_loading.load_rgb_image`) only when an example is read. An image that cannot be
    decoded raises a ``ValueError`` naming the file; run :func:`.image_loading.filter_unreadable`
    first to drop such files up front.
    """
    for column in (image_column, label_column):
        if column not in dataset_split.column_names:
            raise ValueError(f"attach_transform: no column {column!r}; available: {dataset_split.column_names}.")
    raw = dataset_split.cast_column(image_column, ImageFeature(decode=False))
    return raw.with_transform(_RobustTransform(transform, image_column, label_column))


class _RobustTransform:
    """The batch function behind :func:`attach_transform`; a class (not a closure) so that DataLoader
    workers started with ``spawn``/``forkserver`` can pickle it."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], image_column: str, label_column: str):
        self.transform = transform
        self.image_column = image_column
        self.label_column = label_column

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        pixel_values = []
        for record in batch[self.image_column]:
            skipped = SkippedImages()
            image = load_rgb_image(record, skipped)
            if image is None:
                raise ValueError(
                    f"Cannot decode image {describe_source(record)} ({skipped.reasons[0]}). Drop unreadable "
                    "images before training with crossmetric.data.image_loading.filter_unreadable(dataset)."
                )
            pixel_values.append(self.transform(image))
        return {"pixel_values": pixel_values, "labels": [int(label) for label in batch[self.label_column]]}


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples from :func:`attach_transform` into ``{"pixel_values": (B,3,H,W), "labels": (B,)}``."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples], dtype=torch.long),
    }
