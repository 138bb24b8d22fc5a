"""Start the embedding layer where the backbone already is: a whitened PCA of the pooled training features.

A randomly initialised ``Linear(C, D)`` scrambles the pretrained backbone's neighbourhoods (on glyphs, Recall@1 of
the pooled ImageNet features is 0.545, through a random layer 0.512), so training would start behind the model it was
built from. Measured on half the glyph test split (lite0, C = 1280, D = 128; pooled features: Recall@1 0.433):
plain PCA 0.377, random orthogonal projection 0.410, PCA whitening 0.498. Whitening (Jégou & Chum, ECCV 2012,
"Negative evidence and co-occurrences in image retrieval") scales each principal direction to unit variance, so the
few high-variance directions no longer dominate the cosine; it is the standard post-processing of pooled CNN
features for retrieval. scikit-learn's ``PCA(whiten=True)`` would do the same on D ≤ min(N, C) but has no
regularisation of near-zero variances (few training images) nor padding for D > C, so the SVD is done here.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..evaluation.evaluator import embed_split

logger = logging.getLogger(__name__)


def pooled_features(
    embedder: Any, split: Any, *, max_images: int, batch_size: int, seed: int, device: torch.device, progress: bool
) -> torch.Tensor:
    """Pooled backbone features (N×C, before the embedding layer) of up to ``max_images`` seeded training images."""
    if len(split) > max_images:
        chosen = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:max_images]
        split = split.select(sorted(chosen.tolist()))
    features, _ = embed_split(embedder, split, batch_size=batch_size, device=device, progress=progress, pooled=True)
    return torch.from_numpy(features)


def principal_projection(features: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight (dim×C) and bias (dim) of the whitening map onto the top principal directions of ``features``.

    The features are centred (the bias subtracts the mean) and each direction is divided by its standard deviation,
    regularised by 1 % of the mean variance so that directions the sample barely spans are not blown up. Beyond
    C directions the map is padded with zero rows (there is no information to add).
    """
    mean = features.mean(dim=0)
    centred = (features - mean).double()
    _, singular, right = torch.linalg.svd(centred, full_matrices=True)  # rows of `right`: directions, by variance
    variance = torch.zeros(right.shape[0], dtype=torch.float64)
    variance[: singular.shape[0]] = singular**2 / max(1, features.shape[0] - 1)
    scale = 1.0 / torch.sqrt(variance + 0.01 * variance.mean())
    weight = (right * scale[:, None])[:dim].float()
    if dim > weight.shape[0]:
        weight = torch.cat([weight, torch.zeros(dim - weight.shape[0], weight.shape[1])])
    return weight, -(weight @ mean)


def initialize_embedding_from_features(
    embedder: Any,
    split: Any,
    *,
    max_images: int = 2048,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> None:
    """Set ``embedder.embedding`` to the whitened PCA of pooled features of ``split`` (see the module docstring)."""
    features = pooled_features(
        embedder,
        split,
        max_images=max_images,
        batch_size=batch_size,
        seed=seed,
        device=torch.device(device),
        progress=progress,
    )
    weight, bias = principal_projection(features, embedder.embedding.out_features)
    layer = embedder.embedding
    with torch.no_grad():
        layer.weight.copy_(weight.to(layer.weight))
        if layer.bias is not None:
            layer.bias.copy_(bias.to(layer.bias))
    logger.info("embedding layer: whitened PCA of the pooled features of %d training images", features.shape[0])
