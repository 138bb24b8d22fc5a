"""One tiny exported folder with every format (safetensors, sentence-transformers files, onnx/), for several tests."""

from __future__ import annotations

from pathlib import Path

import torch
from _training_fixtures import make_shapes_folder
from PIL import Image
from transformers import AutoImageProcessor

from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning
from crossmetric.model_cards.sentence_transformers_files import sentence_transformers_files
from crossmetric.modeling.modeling_crossmetric import save_embedder


def tiny_full_export(root: Path, onnx: bool = True) -> tuple[CrossMetricForMetricLearning, Path, Path]:
    """``(model, export folder, image folder)``: a random tiny embedder exported as ``crossmetric export --onnx``
    writes it (the ONNX check runs on real images of a shapes folder)."""
    torch.manual_seed(0)
    config = CrossMetricConfig(backbone="test_resnet", embedding_dim=16, image_size=32, cia_dim=16, cia_heads=2)
    model = CrossMetricForMetricLearning(config).eval()
    images = make_shapes_folder(root / "shapes", num_classes=4, per_class=3)
    directory = save_embedder(model.embedder, root / "export", extra_files=sentence_transformers_files())
    if onnx:
        from crossmetric.hub.onnx_export import export_onnx

        export_onnx(model.embedder, directory, pixel_values(directory, image_files(images)[:5]))
    return model, directory, images


def image_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


def pixel_values(directory: Path, files: list[Path]) -> torch.Tensor:
    """The folder's own preprocessing of ``files``."""
    processor = AutoImageProcessor.from_pretrained(directory)
    return processor([Image.open(f).convert("RGB") for f in files], return_tensors="pt")["pixel_values"]
