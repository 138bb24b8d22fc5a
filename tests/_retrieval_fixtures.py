"""Shared builders for the retrieval tests: a tiny exported embedder, real image files, brute-force search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor

from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning, CrossMetricModel


def export_tiny_model(directory: Path, seed: int = 0, embedding_dim: int = 32) -> Path:
    """A randomly initialised ``test_resnet`` embedder exported with ``save_embedder``."""
    torch.manual_seed(seed)
    config = CrossMetricConfig(backbone="test_resnet", embedding_dim=embedding_dim, image_size=64)
    CrossMetricForMetricLearning(config).eval().save_embedder(directory)
    return directory


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """A real PNG/JPEG of smooth random colour blobs (distinct embeddings even from an untrained model)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def make_class_folder(root: Path, classes: int = 3, per_class: int = 4, broken: bool = False) -> Path:
    """``root/class_<c>/<i>.png`` (+ one file that is not an image when ``broken``)."""
    for c in range(classes):
        for i in range(per_class):
            write_image(root / f"class_{c}" / f"{i}.png", seed=100 * c + i)
    if broken:
        (root / "class_0" / "broken.jpg").write_bytes(b"this is not a JPEG")
    return root


def embed_reference(model_dir: Path, images: list[Image.Image | Path]) -> np.ndarray:
    """Embeddings computed the plain way (processor + model, no batching helpers), for comparisons."""
    model = CrossMetricModel.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    decoded = [Image.open(i).convert("RGB") if isinstance(i, (str, Path)) else i for i in images]
    with torch.no_grad():
        return model(processor(images=decoded, return_tensors="pt")["pixel_values"]).pooler_output.numpy()


def brute_force(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows and cosine scores by a full numpy matrix product and a stable sort."""
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ g.T.astype(np.float64)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)
