"""Embed an evaluation split with the embedder and compute the retrieval metrics on its unseen classes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..modeling.modeling_crossmetric import CrossMetricModel
from ..training.data.transforms import attach_transform, build_transform, collate_fn
from ..training.fault_points import fault_point
from .metrics import retrieval_metrics


@torch.no_grad()
def embed_split(
    embedder: CrossMetricModel,
    split: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (N×D float32) and labels (N) of a ``datasets`` split with ``image`` and ``label`` columns,
    preprocessed as the model's evaluation transform (resize, centre crop)."""
    device = torch.device(device) if device is not None else next(embedder.parameters()).device
    transform = build_transform(embedder.config.preprocessing, train=False)
    loader = DataLoader(
        attach_transform(split, transform),
        batch_size=batch_size,
        collate_fn=collate_fn,
        generator=torch.Generator(),  # creating the iterator must not draw from the global RNG (exact resume)
    )
    was_training = embedder.training
    embedder.eval().to(memory_format=torch.channels_last)  # faster CPU convolutions; values unchanged
    embeddings, labels = [], []
    for batch in tqdm(loader, desc="embedding", disable=not progress, dynamic_ncols=True, leave=False):
        output = embedder(batch["pixel_values"].to(device).contiguous(memory_format=torch.channels_last))
        embeddings.append(output.pooler_output.float().cpu().numpy())
        labels.append(batch["labels"].numpy())
        fault_point("evaluation")  # test hook (tests/test_faults.py): a no-op unless CROSSMETRIC_TEST_PAUSE is set
    embedder.train(was_training)
    return np.concatenate(embeddings), np.concatenate(labels)


def evaluate_embedder(
    embedder: CrossMetricModel,
    split: Any,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int = 0,
    ks: tuple[int, ...] = (1, 2, 4, 8),
) -> dict[str, float]:
    """Recall@K, MAP@R, R-precision and NMI of the embedder on ``split`` (every image queries all others)."""
    embeddings, labels = embed_split(embedder, split, batch_size=batch_size, device=device, progress=progress)
    return retrieval_metrics(embeddings, labels, ks=ks, seed=seed, progress=False)
