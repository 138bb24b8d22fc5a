"""How many tokens the head attends over: the grid of its keys and values at the run's input size, said in the log.

Cross-image attention lets one image ask which parts of the other matter; that needs parts. The grid is set by two
switches, the input size (``--image_size``) and the backbone stage the head reads (``--cia_token_stride``):
``tf_efficientnet_lite0`` gives 4×4 tokens at 64 px from its stride-16 stage (the default), 2×2 from its last map;
the paper's ResNet-50 at 224 px gives 7×7, which lite0 reaches at 112 px with the stride-16 stage or at 224 px with
the stride-32 stage, its last map (``--image_size 112``, or ``--image_size 224 --cia_token_stride 32``; issue 29).
The run measures the grid once (one forward pass of a blank image, no random numbers) and records it with the recipe's
choices, so every benchmark row states its token count.
"""

from __future__ import annotations

import math
from typing import Any

import torch


@torch.no_grad()
def head_token_grid(model: Any) -> dict[str, Any] | None:
    """``{"grid": [H, W] or None, "tokens", "channels", "stage"}`` of ``model``'s head (a
    ``CrossMetricForMetricLearning``) at its ``config.image_size``; None when the head is off."""
    if model.head is None:
        return None
    embedder = model.embedder
    was_training = embedder.training
    device = next(embedder.parameters()).device
    embedder.eval()
    try:
        size = model.config.image_size
        _, _, tokens, grid = model.forward_head_inputs(torch.zeros(1, 3, size, size, device=device))
    finally:
        embedder.train(was_training)
    count = int(tokens.shape[1])
    if grid is None and math.isqrt(count) ** 2 == count:  # the embedder's own map, flattened (a CNN's last map)
        grid = (math.isqrt(count), math.isqrt(count))
    stage = model.head_token_stage or "the last feature map"
    return {"grid": None if grid is None else list(grid), "tokens": count, "channels": int(tokens.shape[2]),
            "stage": stage}  # fmt: skip


def head_token_note(model: Any) -> str | None:
    """One line for the log: the head's token grid, its stage and the input size (None when the head is off)."""
    info = head_token_grid(model)
    stride, image_size = model.config.cia_token_stride, model.config.image_size
    if info is None:
        return None
    grid = info["grid"]
    shape = f"{grid[0]}×{grid[1]} = {info['tokens']}" if grid else str(info["tokens"])
    where = f"stage {info['stage']} (--cia_token_stride {stride})" if stride else info["stage"]
    return f"head tokens: {shape} per image, {info['channels']} channels, from {where} at {image_size} px"
