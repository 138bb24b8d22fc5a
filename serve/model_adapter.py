"""The server's one door to the rest of crossmetric: load a model by reference, decode an image, run a batch.

Everything ``serve/`` needs from the layers below it about models and images goes through here, so that a move of
model loading or image decoding changes this file only:

- :func:`check_model` resolves a model argument cheaply (no weights read), for the command's early checks;
- :func:`load_served_model` loads the embedder and its image processor with the torch or ONNX backend;
- :meth:`ServedModel.decode` turns the bytes of one upload into an RGB image with crossmetric's robust decoding
  (EXIF orientation, 16-bit, alpha on white; truncated, corrupt, non-image and decompression-bomb inputs refused with
  the reason), and :meth:`ServedModel.embed_images` runs one batch of decoded images through the model's own image
  processor and the per-batch step of crossmetric's embedding loop
  (:func:`crossmetric.inference.embedding.pooler_output`) and returns their L2-normalised embeddings.

The server does not call the loop itself (:func:`~crossmetric.inference.embedding.embed_images`): it has decoded each
upload already, in its own threads and with its own pixel limit, so that a 422 can name the input before the batch is
formed, and the loop would decode every image again and build a ``DataLoader`` per batch (measured on the main job's
64 px model: 0.5 ms more per batch and 0.2 ms more per image, about a seventh of the server's CPU per image).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.image_loading import SkippedImages, load_rgb_image
from ..inference.embedding import model_reference, pooler_output
from ..inference.loading import load_embedder, resolve_model
from ..inference.onnx_runtime import OnnxEmbedder

RERANKER_FOLDER = "reranker"


class UndecodableImage(ValueError):
    """An input that is not an image this server can decode; ``reason`` says why (for the 422 body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_model(reference: str, backend: str) -> Path | str:
    """The exported folder (or Hub id) ``reference`` names, without loading it; ValueError naming ``--model``.

    A training checkpoint without an export is refused (the server serves exports), as is ``--backend onnx`` on a
    folder without ``onnx/model.onnx``.
    """
    kind, source = resolve_model(reference)
    if kind == "checkpoint":
        raise ValueError(f"--model {reference!r} is a training checkpoint without an export: run `crossmetric export`.")
    if backend == "onnx" and kind == "export" and not (Path(source) / "onnx" / "model.onnx").is_file():
        raise ValueError(
            f"--backend onnx needs {Path(source) / 'onnx' / 'model.onnx'}: export with `crossmetric export --onnx`, "
            "or serve with --backend torch."
        )
    return source


def has_reranker(source: Path | str) -> bool:
    """Whether an exported model folder carries a re-ranker (``MODEL/reranker/``)."""
    return isinstance(source, Path) and (source / RERANKER_FOLDER).is_dir()


@dataclass
class ServedModel:
    """An embedder and its preprocessing, as the server runs them.

    Attributes:
        name: the model argument it was loaded from.
        backend: ``"torch"`` or ``"onnx"``.
        embedder: the loaded ``CrossMetricModel`` or ONNX Runtime embedder.
        processor: the model's image processor.
        device: where the torch backend runs.
        max_image_pixels: the decompression-bomb limit applied to every decoded input.
    """

    name: str
    backend: str
    embedder: Any
    processor: Any
    device: Any = None
    max_image_pixels: int = 40_000_000
    reference: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding_dim(self) -> int:
        return int(self.embedder.config.embedding_dim)

    @property
    def image_size(self) -> int:
        return int(self.embedder.config.image_size)

    @property
    def onnx_file(self) -> str | None:
        return getattr(self.embedder, "onnx_file", None)

    def decode(self, data: bytes) -> Image.Image:
        """The RGB image in ``data``, or :class:`UndecodableImage` with the reason (bombs included)."""
        if not data:
            raise UndecodableImage("empty input (0 bytes)")
        try:
            with Image.open(io.BytesIO(data)) as probe:  # header only: refuse a bomb before any pixel is decoded
                pixels = probe.width * probe.height
        except Exception:  # not identifiable: load_rgb_image gives the reason
            pixels = 0
        if pixels > self.max_image_pixels:
            raise UndecodableImage(
                f"too large, refused as a possible decompression bomb: {pixels} pixels, more than the server's "
                f"--max_image_pixels {self.max_image_pixels}"
            )
        skipped = SkippedImages()
        image = load_rgb_image(data, skipped)
        if image is None:
            raise UndecodableImage(skipped.reasons[0] if skipped.reasons else "not a decodable image")
        return image

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """The embeddings of decoded ``images`` as one batch (preprocessing and forward pass), float32 N × D."""
        import torch

        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        if self.device is not None:
            pixel_values = pixel_values.to(self.device)
        with torch.inference_mode():
            embeddings = pooler_output(self.embedder, pixel_values)["embeddings"]
        if isinstance(embeddings, torch.Tensor):
            return embeddings.float().cpu().numpy()
        return np.asarray(embeddings, dtype=np.float32)


def load_served_model(
    reference: str | os.PathLike,
    backend: str = "torch",
    device: str | None = None,
    max_image_pixels: int = 40_000_000,
    threads: int | None = None,
) -> ServedModel:
    """Load ``reference`` (an exported folder or Hub id) with ``backend``; the torch model is moved to ``device``
    (default: cuda when available) and put in eval mode.

    ``threads``: intra-op threads of the model (ONNX Runtime's session) and of torch in this process, which the image
    processor uses with either backend (None: the libraries' defaults).
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    if backend == "onnx":
        from transformers import AutoImageProcessor

        embedder: Any = OnnxEmbedder(str(reference), threads=threads)
        processor = AutoImageProcessor.from_pretrained(embedder.folder)
        return ServedModel(
            str(reference), backend, embedder, processor, None, max_image_pixels, model_reference(embedder)
        )
    embedder, processor = load_embedder(str(reference), backend=backend)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    embedder = embedder.to(torch_device).eval()
    return ServedModel(
        str(reference), backend, embedder, processor, torch_device, max_image_pixels, model_reference(embedder)
    )
