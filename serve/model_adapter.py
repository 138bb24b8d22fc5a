"""The server's one door to the rest of crossmetric: load a model by reference, decode an image, run a batch.

Everything ``serve/`` needs from the layers below it about models and images goes through here, so that a move of
model loading or image decoding changes this file only:

- :func:`check_model` resolves a model argument cheaply (no weights read), for the command's early checks;
- :func:`load_served_model` loads the embedder and its image processor with the torch or ONNX backend;
- :func:`find_served_reranker` says where the model's re-ranker (``reranker/``) is, without loading it, and
  :func:`reranker_config_of` reads its configuration alone (the command's early checks);
- :meth:`ServedModel.decode` turns the bytes of one upload into an RGB image with crossmetric's robust decoding
  (EXIF orientation, 16-bit, alpha on white; truncated, corrupt, non-image and decompression-bomb inputs refused with
  the reason); :meth:`ServedModel.prepare_batch` runs a batch of decoded images through the model's own image
  processor, and :meth:`ServedModel.run_batch` runs the per-batch step of crossmetric's embedding loop
  (:func:`crossmetric.inference.embedding.pooler_output`) on it and returns their L2-normalised embeddings (the
  server runs the two in separate threads, overlapping: :mod:`.batching`);
- with a re-ranker loaded (``--rerank_top_k``), :meth:`ServedModel.run_batch` runs the loop's
  :func:`~crossmetric.inference.embedding.embeddings_and_reranker_tokens` step instead: the same single backbone pass
  gives each image's embedding and the tokens the re-ranker reads. The re-ranker uses the served embedder (it is
  loaded with it, in one :class:`~crossmetric.inference.loaded_model.LoadedModel`): there is no second backbone.

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
from ..inference.embedding import embeddings_and_reranker_tokens, model_reference, pooler_output
from ..inference.loaded_model import LoadedModel
from ..inference.loading import resolve_model
from ..inference.onnx_runtime import OnnxEmbedder
from ..inference.reranker_loading import Location, find_reranker, reranker_config
from .settings import RERANK_NEEDS_TORCH

Batch = np.ndarray | tuple[np.ndarray, np.ndarray]  # embeddings N × D, or (embeddings, re-ranker tokens N × T × C)


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


def find_served_reranker(source: Path | str) -> Location | None:
    """Where the re-ranker of ``source`` (from :func:`check_model`: ``MODEL/reranker/`` or the Hub repo's) is, or
    None; nothing is loaded (for a Hub id only ``reranker/config.json`` is asked for)."""
    return find_reranker(source)


def no_reranker_refusal(model: str) -> str:
    """The refusal of ``--rerank_top_k`` for a model argument without a re-ranker."""
    return f"--rerank_top_k needs a model exported with a re-ranker ({model}/reranker/); this model has none."


def reranker_config_of(location: Location) -> Any:
    """The configuration alone (token stage and channels, fusion) of the re-ranker at ``location``."""
    return reranker_config(location)


def _as_array(value: Any) -> np.ndarray:
    """A float32 numpy array of a forward output (torch tensor or ONNX Runtime array)."""
    if hasattr(value, "detach"):
        return value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


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
        reference: what an index records about the model (name, embedding size, weight fingerprint).
        reranker: the model's ``CrossMetricReranker``, sharing ``embedder``, when the server re-ranks (else None).
    """

    name: str
    backend: str
    embedder: Any
    processor: Any
    device: Any = None
    max_image_pixels: int = 40_000_000
    reference: dict[str, Any] = field(default_factory=dict)
    reranker: Any = None

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

    def prepare_batch(self, images: list[Image.Image]) -> Any:
        """The model's input for decoded ``images``: the image processor's pixel values, on the model's device."""
        pixel_values = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return pixel_values.to(self.device) if self.device is not None else pixel_values

    def run_batch(self, pixel_values: Any) -> Batch:
        """What one batch of the server runs on prepared pixel values: the embeddings (float32 N × D), and the
        re-ranker's tokens too (N × T × C, from the same backbone pass) when one is loaded."""
        import torch

        with torch.inference_mode():
            if self.reranker is None:
                return _as_array(pooler_output(self.embedder, pixel_values)["embeddings"])
            outputs = embeddings_and_reranker_tokens(self.reranker.config.token_stage)(self.embedder, pixel_values)
        return _as_array(outputs["embeddings"]), _as_array(outputs["tokens"])

    def reranker_info(self) -> dict[str, Any] | None:
        """What ``/info`` shows of the loaded re-ranker (None without one)."""
        if self.reranker is None:
            return None
        config = self.reranker.config
        return {
            "token_stage": config.token_stage, "token_dim": int(config.token_dim), "alpha": float(config.alpha),
            "reranks": bool(config.reranks),
        }  # fmt: skip


def load_served_model(
    reference: str | os.PathLike,
    backend: str = "torch",
    device: str | None = None,
    max_image_pixels: int = 40_000_000,
    threads: int | None = None,
    reranker: Location | None = None,
) -> ServedModel:
    """Load ``reference`` (an exported folder or Hub id) with ``backend``; the torch model is moved to ``device``
    (default: cuda when available) and put in eval mode.

    ``threads``: intra-op threads of the model (ONNX Runtime's session) and of torch in this process, which the image
    processor uses with either backend (None: the libraries' defaults). ``reranker``: where the model's re-ranker is
    (:func:`find_served_reranker`), loaded with the served embedder (torch backend only).
    """
    import torch

    if reranker is not None and backend != "torch":
        raise ValueError(RERANK_NEEDS_TORCH)
    if threads:
        torch.set_num_threads(threads)
    if backend == "onnx":
        from transformers import AutoImageProcessor

        embedder: Any = OnnxEmbedder(str(reference), threads=threads)
        processor = AutoImageProcessor.from_pretrained(embedder.folder)
        return ServedModel(
            str(reference), backend, embedder, processor, None, max_image_pixels, model_reference(embedder)
        )
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # the embedder, its processor and the re-ranker sharing it, loaded once (as search and the pipeline load them)
    loaded = LoadedModel.load(str(reference), rerank=reranker is not None, device=torch_device, reranker_at=reranker)
    return ServedModel(
        str(reference), backend, loaded.embedder, loaded.processor, torch_device, max_image_pixels, loaded.reference,
        loaded.reranker,
    )  # fmt: skip
