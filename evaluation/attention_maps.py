"""Where the cross-image-attention head looks: attention maps of image pairs, drawn over the images.

For a pair (i, j), level l of the head lets image j's current conditional embedding query image i's feature-map
tokens (docs/design.md §1); ``CrossMetricForMetricLearning(..., output_attentions=True)`` returns those weights as one
B×B×heads×T tensor per level. Averaged over heads and reshaped to the token grid (a CNN's H'×W' map, row-major,
or a ViT's patch grid), upsampled to the input size and laid over image i, they show which parts of image i decide
its similarity to image j. The images are shown as the model sees them (resized and centre-cropped, colours
un-normalised), so the map and the picture line up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning, CrossMetricModel


@dataclass
class PairAttention:
    """Attention of the pairs (i, j): ``maps`` P×L×H'×W' (heads averaged; each map sums to 1 over its tokens) and
    the conditional similarities ``similarities`` P×L (``S^l[i, j]``)."""

    maps: np.ndarray
    similarities: np.ndarray


def select_pairs(labels: Sequence[int], num_pairs: int, seed: int) -> list[tuple[int, int, bool]]:
    """Up to ``num_pairs`` positive (same class) and ``num_pairs`` negative pairs ``(i, j, positive)``, seeded.

    Positive pairs come from different classes where possible; negative pairs pair images of different classes.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    pairs: list[tuple[int, int, bool]] = []
    for label in rng.permutation(classes[counts > 1])[:num_pairs]:
        i, j = rng.choice(np.flatnonzero(labels == label), size=2, replace=False)
        pairs.append((int(i), int(j), True))
    if len(classes) > 1:
        for _ in range(num_pairs):
            i = int(rng.integers(len(labels)))
            j = int(rng.choice(np.flatnonzero(labels != labels[i])))
            pairs.append((i, j, False))
    return pairs


def token_grid(embedder: CrossMetricModel, pixel_values: torch.Tensor) -> tuple[int, int]:
    """(H', W') of the embedder's tokens for inputs shaped like ``pixel_values`` (one image is enough).

    A CNN's final feature map gives it directly; for a ViT it is the patch grid (``patch_embed.grid_size`` when
    it accounts for every token, else a square grid).
    """
    with torch.no_grad():
        features = embedder.backbone.forward_features(pixel_values[:1])
    if features.dim() == 4:
        return int(features.shape[-2]), int(features.shape[-1])
    num_tokens = features.shape[1] - embedder.num_prefix_tokens
    grid = getattr(getattr(embedder.backbone, "patch_embed", None), "grid_size", None)
    if grid is not None and int(grid[0]) * int(grid[1]) == num_tokens:
        return int(grid[0]), int(grid[1])
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} tokens of {embedder.config.backbone} do not form a known grid.")
    return side, side


@torch.no_grad()
def pair_attention(
    model: CrossMetricForMetricLearning, pixel_values: torch.Tensor, pairs: Sequence[tuple[int, int]]
) -> PairAttention:
    """Head-averaged attention maps (P×L×H'×W') and conditional similarities (P×L) of ``pairs`` of a batch.

    ``pixel_values`` holds the batch's preprocessed images; a pair (i, j) indexes it. The head conditions each
    pair on its two images only, so which other images share the batch does not change the result.
    """
    if model.head is None:
        raise ValueError("the model has no cross-image-attention head (cia_levels=0): it has no attention to show.")
    was_training = model.training
    model.eval()
    try:
        output = model(pixel_values, output_attentions=True)
        grid = model.forward_head_inputs(pixel_values[:1])[3]
        height, width = grid if grid is not None else token_grid(model.embedder, pixel_values)
    finally:
        model.train(was_training)
    rows = torch.tensor([i for i, _ in pairs])
    columns = torch.tensor([j for _, j in pairs])
    maps = torch.stack([level[rows, columns].float().mean(dim=1) for level in output.attentions], dim=1)
    similarities = torch.stack([s[rows, columns].float() for s in output.conditional_similarities], dim=1)
    return PairAttention(
        maps=maps.reshape(len(pairs), len(output.attentions), height, width).cpu().numpy(),
        similarities=similarities.cpu().numpy(),
    )


def unnormalise(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """B×3×H×W normalised tensors back to B×H×W×3 RGB images in [0, 1] (the model's view, original colours)."""
    mean_t = torch.tensor(mean, dtype=pixel_values.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixel_values.dtype).view(1, 3, 1, 1)
    return (pixel_values.cpu() * std_t + mean_t).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def upsample_map(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of an H'×W' map to the image size, stretched to [0, 1] between its minimum and maximum
    (a uniform map gives zeros). Token (r, c) covers the image's r-th row band and c-th column band."""
    tensor = torch.from_numpy(np.ascontiguousarray(grid, dtype=np.float32))[None, None]
    upsampled = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
    low, high = float(upsampled.min()), float(upsampled.max())
    return (upsampled - low) / (high - low) if high - low > 1e-12 else np.zeros_like(upsampled)


def _bare(axes) -> None:
    axes.set_xticks([])
    axes.set_yticks([])


def plot_attention_maps(
    images: np.ndarray,
    pairs: Sequence[tuple[int, int, bool]],
    attention: PairAttention,
    labels: Sequence[str],
    path: str | Path,
) -> Path:
    """One row per pair (i, j): image j (the asker), image i, then per level the attention over image i.

    ``images`` are the batch's images as the model sees them (B×H×W×3 in [0, 1], see :func:`unnormalise`);
    ``labels`` their class names. Each map is stretched between its own lowest and highest weight (colour =
    relative attention); its title gives the level's conditional similarity S^l[i, j] and that weight range, to
    compare with the uniform weight 1/T.
    """
    num_levels = attention.maps.shape[1]
    rows, columns = len(pairs), 2 + num_levels
    figure = Figure(figsize=(max(1.9 * columns, 7.6), 2.0 * rows + 0.8), dpi=110, layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    height, width = images.shape[1:3]
    for r, (i, j, positive) in enumerate(pairs):
        kind = "positive" if positive else "negative"
        grid[r, 0].imshow(images[j])
        grid[r, 0].set_title(f"{kind} pair\nj (asks): {labels[j][:16]}", fontsize=8)
        grid[r, 0].set_ylabel(kind, fontsize=8)
        grid[r, 1].imshow(images[i])
        grid[r, 1].set_title(f"i (attended)\n{labels[i][:16]}", fontsize=8)
        for level in range(num_levels):
            axes = grid[r, 2 + level]
            axes.imshow(images[i])
            axes.imshow(
                upsample_map(attention.maps[r, level], height, width),
                cmap="jet",
                alpha=0.45,
                vmin=0,
                vmax=1,
                extent=(-0.5, width - 0.5, height - 0.5, -0.5),
            )
            weights = attention.maps[r, level]
            axes.set_title(
                f"level {level + 1}: S={attention.similarities[r, level]:.3f}\n"
                f"w {weights.min():.3g}–{weights.max():.3g}",
                fontsize=8,
            )
        for axes in grid[r]:
            _bare(axes)
    grid_h, grid_w = attention.maps.shape[2:]
    figure.suptitle(
        "Cross-image attention: where j's query looks in image i\n"
        f"heads averaged over {grid_h}×{grid_w} tokens (uniform w = {1 / (grid_h * grid_w):.3g}); "
        "colour: each map's lowest to highest w\n"
        "S: the pair's conditional similarity at that level",
        fontsize=10,
    )
    figure.savefig(path)
    return Path(path)
