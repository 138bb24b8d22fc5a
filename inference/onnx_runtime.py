"""Embedding through ONNX Runtime, with no PyTorch model loaded (``--backend onnx``); the ONNX files' names.

:class:`OnnxEmbedder` runs ``onnx/model.onnx`` (or ``model_quantized.onnx``) of an exported folder or Hub repo and
offers what :func:`~crossmetric.inference.embedding.embed_images` uses of a ``CrossMetricModel``: a ``config``, a call
on ``pixel_values`` whose result has ``pooler_output``, ``to``/``eval``/``parameters``, and the model reference an
index records. So ``build_index(..., backend="onnx")``, ``EmbeddingIndex.from_folder(..., backend="onnx")``,
``crossmetric index build --backend onnx`` and ``crossmetric search --backend onnx`` embed with ONNX Runtime; the
preprocessing is the folder's own ``preprocessor_config.json``, as for the PyTorch backend.

Only the small files and the ONNX file are read (downloaded from the Hub for a repo id): never ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..modeling.configuration_crossmetric import CrossMetricConfig

BACKENDS = ("torch", "onnx")
ONNX_DIR = "onnx"
FP32_FILE = "model.onnx"
INT8_FILE = "model_quantized.onnx"
CHECK_FILE = "export_check.json"
INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("last_hidden_state", "pooler_output")


def require_onnx(what: str = "--onnx") -> None:
    """Raise ImportError naming the extra to install when onnx, onnxscript or onnxruntime is missing."""
    missing = []
    for module in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(
            f"{what} needs {', '.join(missing)}, which crossmetric does not install by default: "
            'pip install "crossmetric[onnx]".'
        )


def session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU inference session of ``path``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(onnx_session: Any, pixel_values: torch.Tensor | np.ndarray) -> np.ndarray:
    """``pooler_output`` of one batch through an ONNX Runtime session, float32 B × D."""
    pixels = pixel_values.numpy() if isinstance(pixel_values, torch.Tensor) else pixel_values
    (embeddings,) = onnx_session.run([OUTPUT_NAMES[1]], {INPUT_NAME: np.ascontiguousarray(pixels, np.float32)})
    return embeddings


@dataclass
class OnnxOutput:
    """The part of ``CrossMetricModelOutput`` that embedding reads."""

    pooler_output: torch.Tensor


def _resolve_folder(model: str | os.PathLike, onnx_file: str) -> Path:
    """A local folder with config.json, preprocessor_config.json and ``onnx/<onnx_file>`` (a Hub id: downloaded)."""
    path = Path(model)
    if not path.exists():
        from huggingface_hub import snapshot_download

        names = ["config.json", "preprocessor_config.json", f"{ONNX_DIR}/{onnx_file}", f"{ONNX_DIR}/{CHECK_FILE}"]
        path = Path(snapshot_download(str(model), allow_patterns=names))
    if not (path / f"{ONNX_DIR}/{onnx_file}").is_file():
        raise FileNotFoundError(
            f"model {str(model)!r} has no {ONNX_DIR}/{onnx_file}: export it with "
            "`crossmetric export --checkpoint RUN --output_dir DIR --onnx`, or use --backend torch."
        )
    return path


class OnnxEmbedder:
    """An exported embedder run by ONNX Runtime on the CPU; quacks like ``CrossMetricModel`` for embedding.

    Args:
        model: an exported folder or a Hub repo id with ``onnx/model.onnx``.
        quantized: run the 8-bit ``onnx/model_quantized.onnx`` instead of fp32.
        threads: ONNX Runtime intra-op threads (default: its own choice).
    """

    def __init__(self, model: str | os.PathLike, *, quantized: bool = False, threads: int | None = None) -> None:
        require_onnx("the onnx backend")
        self.onnx_file = INT8_FILE if quantized else FP32_FILE
        self.folder = _resolve_folder(model, self.onnx_file)
        self.name_or_path = str(model)
        self.config = CrossMetricConfig.from_pretrained(self.folder)
        self.session = session(self.folder / ONNX_DIR / self.onnx_file, threads)

    def __call__(self, pixel_values: torch.Tensor | np.ndarray, **kwargs: Any) -> OnnxOutput:
        """The L2-normalised embeddings (``pooler_output``) of a preprocessed batch B × 3 × H × W."""
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().float().cpu()
        return OnnxOutput(torch.from_numpy(run_session(self.session, pixel_values)))

    def to(self, device: Any) -> OnnxEmbedder:
        """ONNX Runtime runs on the CPU here: a GPU device is refused rather than silently ignored."""
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"the onnx backend runs on the CPU; drop --device {device} or use --backend torch.")
        return self

    def eval(self) -> OnnxEmbedder:
        return self

    def parameters(self) -> Any:
        return iter(())

    def model_reference(self) -> dict[str, Any]:
        """What an index records: the same fields, and the same weight fingerprint, as for the PyTorch model."""
        reference: dict[str, Any] = {
            "name_or_path": self.name_or_path,
            "model_type": self.config.model_type,
            "embedding_dim": self.config.embedding_dim,
        }
        check = self.folder / ONNX_DIR / CHECK_FILE
        fingerprint = json.loads(check.read_text()).get("fingerprint") if check.is_file() else None
        if fingerprint:
            reference["fingerprint"] = fingerprint
        return reference

    def __repr__(self) -> str:
        return f"OnnxEmbedder({self.name_or_path!r}, {self.onnx_file})"


def load_onnx_embedder(
    model: str | os.PathLike, image_processor: Any | None = None, *, quantized: bool = False
) -> tuple[OnnxEmbedder, Any]:
    """``(OnnxEmbedder, image_processor)`` of an exported folder or Hub id, the processor from its own config."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"the onnx backend takes an exported folder or a Hub id, got {type(model).__name__}.")
    embedder = OnnxEmbedder(model, quantized=quantized)
    if image_processor is None:
        from transformers import AutoImageProcessor

        image_processor = AutoImageProcessor.from_pretrained(embedder.folder)
    return embedder, image_processor


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else a ValueError naming the choices."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    return backend
