"""Robust decoding of real-world image files to RGB, and dropping the ones that cannot be decoded.

Scraped DML datasets (SOP, In-Shop, web images) contain CMYK JPEGs, 16-bit PNGs, palette images with
transparency, EXIF-rotated photos, animated GIFs, truncated downloads and files that are not images
at all. A single bad file must not kill a training run hours in, so :func:`load_rgb_image` turns
every readable file into an RGB ``PIL.Image`` (orientation applied) and returns ``None`` with a
warning naming the file for the rest; :func:`filter_unreadable` drops those up front, in parallel,
with a progress bar, and reports them in a :class:`SkippedImages`.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

# Individual warnings beyond this many per report are folded into the summary (a broken scrape can
# hold thousands of bad files).
_MAX_LOGGED = 20


@dataclass
class SkippedImages:
    """Images that could not be decoded: ``files`` (names) and ``reasons``, in the order met."""

    files: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.files)

    def add(self, name: str, reason: str) -> None:
        self.files.append(name)
        self.reasons.append(reason)
        if self.count == _MAX_LOGGED + 1:
            logger.warning("More unreadable images follow; see the summary at the end.")

    def summary(self) -> str:
        """One line with the count and the first few files (for the end of a run)."""
        if not self.count:
            return "All images decoded."
        shown = ", ".join(f"{f} ({r})" for f, r in zip(self.files[:5], self.reasons[:5]))
        more = f" and {self.count - 5} more" if self.count > 5 else ""
        return f"Skipped {self.count} unreadable image(s): {shown}{more}."


def describe_source(source: Any) -> str:
    """A human name for an image source: its path where known."""
    if isinstance(source, dict):
        return str(source.get("path") or "<image bytes>")
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray)):
        return "<image bytes>"
    return str(getattr(source, "filename", "") or getattr(source, "name", "") or type(source).__name__)


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


def _open(source: Any) -> Image.Image:
    """Open (not yet decode) ``source``: a path, bytes, a datasets ``{"bytes", "path"}`` dict, a file or an image."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return Image.open(io.BytesIO(source["bytes"]))
        if source.get("path"):
            return Image.open(source["path"])
        raise ValueError("image record has neither bytes nor path")
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    return Image.open(source)


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with alpha on a white background (transparent areas become white, not black)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    """16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) images to 8-bit RGB.

    Pillow's own ``convert`` clips these to 0..255 instead of rescaling, so a 16-bit PNG would come
    out almost white; we rescale by the format's range (or by the data range for ``F`` and ``I``
    images whose values exceed 16 bits).
    """
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) > 255):
        low, high = 0.0, 65535.0
        if array.min(initial=0) < 0 or array.max(initial=0) > 65535:
            low, high = float(array.min()), float(array.max())
    elif image.mode == "F":
        low, high = float(array.min(initial=0)), float(array.max(initial=1))
    else:  # mode I with 8-bit values
        low, high = 0.0, 255.0
    scaled = (array - low) / max(high - low, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: alpha on white, palette transparency honoured, 16-bit rescaled."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        return _on_white(image) if "transparency" in image.info else image.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        return _on_white(image)
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, HSV, ...


def load_rgb_image(
    source: Any, skipped: SkippedImages | None = None, *, draft_size: int | None = None
) -> Image.Image | None:
    """Decode ``source`` fully to an RGB image with its EXIF orientation applied, or return ``None``.

    ``source`` is a path, bytes, a datasets ``{"bytes": ..., "path": ...}`` record, a file object or a
    PIL image. Animated images give their first frame. Truncated, empty, non-image, unreadable and
    decompression-bomb files (more pixels than ``PIL.Image.MAX_IMAGE_PIXELS``) give ``None``, a
    logged warning naming the file, and an entry in ``skipped`` when given. ``draft_size`` lets JPEGs
    decode at reduced scale (for fast validity checks; the whole file is still read).
    """
    name = describe_source(source)
    try:
        with warnings.catch_warnings():
            # Pillow only *warns* between 1x and 2x MAX_IMAGE_PIXELS; treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(source)
            limit = Image.MAX_IMAGE_PIXELS
            if limit and image.width * image.height > limit:
                raise Image.DecompressionBombError(
                    f"{image.width}x{image.height} pixels exceed PIL.Image.MAX_IMAGE_PIXELS={limit}"
                )
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)
            if draft_size is not None and image.format == "JPEG":
                image.draft("RGB", (draft_size, draft_size))
            image.load()  # decode now: truncation and corrupt data surface here, not in a worker later
            try:
                image = ImageOps.exif_transpose(image)
            except Exception as error:  # broken EXIF must not lose an otherwise good image
                logger.debug("Ignoring unreadable EXIF orientation of %s: %s", name, error)
            return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        reason = f"too large, skipped as a possible decompression bomb: {error}"
    except UnidentifiedImageError:
        reason = "not an image Pillow can identify (empty, corrupt or another file type)"
    except (OSError, ValueError, SyntaxError, EOFError) as error:  # truncated, unreadable, missing
        reason = f"{type(error).__name__}: {error}"
    if skipped is not None:
        skipped.add(name, reason)
    if skipped is None or skipped.count <= _MAX_LOGGED:
        logger.warning("Skipping unreadable image %s: %s", name, reason)
    return None


def _check_batch(records: list[Any], draft_size: int | None) -> dict[str, list]:
    """``datasets.map`` worker: decode each record, return readability and the reason if not."""
    ok, names, reasons = [], [], []
    for record in records:
        local = SkippedImages()
        ok.append(load_rgb_image(record, local, draft_size=draft_size) is not None)
        names.append(local.files[0] if local.count else "")
        reasons.append(local.reasons[0] if local.count else "")
    return {"readable": ok, "name": names, "reason": reasons}


def filter_unreadable(
    dataset: Any,
    *,
    image_column: str = "image",
    num_proc: int | None = None,
    draft_size: int | None = 256,
    batch_size: int = 64,
) -> tuple[Any, SkippedImages]:
    """Drop the examples whose image cannot be decoded; return ``(dataset, report)``.

    ``dataset`` is a ``datasets.Dataset`` (or a ``DatasetDict``, filtered split by split) with an
    ``Image`` column. Every image is decoded once (JPEGs at reduced ``draft_size`` scale, which still
    reads the whole file so truncation is caught), in ``num_proc`` processes, with datasets' progress
    bar. Only the small readability column is written to the cache, never the images, and the result
    is the original dataset with an index selection (no rewrite). Running it again on the same data
    is answered from the datasets cache.
    """
    from datasets import DatasetDict
    from datasets import Image as ImageFeature

    if isinstance(dataset, DatasetDict):
        report = SkippedImages()
        kept = {}
        for split, part in dataset.items():
            kept[split], split_report = filter_unreadable(
                part, image_column=image_column, num_proc=num_proc, draft_size=draft_size, batch_size=batch_size
            )
            report.files += split_report.files
            report.reasons += split_report.reasons
        return DatasetDict(kept), report
    if image_column not in dataset.column_names:
        raise ValueError(f"filter_unreadable: no column {image_column!r}; available columns: {dataset.column_names}.")
    raw = dataset.cast_column(image_column, ImageFeature(decode=False))
    checked = raw.map(
        _check_batch,
        input_columns=[image_column],
        batched=True,
        batch_size=batch_size,
        remove_columns=raw.column_names,
        fn_kwargs={"draft_size": draft_size},
        num_proc=num_proc,
        desc="Checking images",
    )
    readable = np.asarray(checked["readable"], dtype=bool)
    report = SkippedImages()
    for index in np.flatnonzero(~readable).tolist():
        row = checked[index]
        report.add(row["name"], row["reason"])
    if report.count:
        logger.warning(report.summary())
        dataset = dataset.select(np.flatnonzero(readable).tolist())
    return dataset, report
