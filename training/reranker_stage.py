"""A short second stage that trains the re-ranker on the finished embedder (``--reranker_stage_steps N``).

The alternative to training the head beside the embedder on detached tokens (``--cia_detach``): the run trains the
embedder with the head skipped (its parameters frozen, so the embedder trains exactly as with the head off), selects
it on validation, and only then trains the head for N steps on the selected embedder's tokens, the embedder frozen
in eval mode. The head then re-ranks for exactly the embedder it learnt from. Runs on the main process (the head is
small; the other processes wait), from the same P×K batches and augmentation as the run; not checkpointed (a crash
during the stage repeats it on resume).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning

logger = logging.getLogger(__name__)


def freeze_head_for_stage(model: CrossMetricForMetricLearning) -> None:
    """Before the main phase (and before DDP wrapping): the head gets no gradient and no optimizer slot."""
    if model.head is not None:
        for parameter in model.head.parameters():
            parameter.requires_grad_(False)


def train_head_stage(
    model: CrossMetricForMetricLearning,
    batches: Iterable[dict[str, torch.Tensor]],
    objective: Any,
    *,
    steps: int,
    learning_rate: float,
    weight_decay: float,
    max_grad_norm: float | None,
    device: torch.device,
    progress: bool = False,
) -> list[float]:
    """Train ``model.head`` for ``steps`` batches on the frozen embedder's outputs; returns the losses per step.

    ``objective`` is the run's :class:`CrossImageAttentionObjective`: the head's loss is ``Σ_l w_l · L_pair(S^l)``
    with its pair loss and level weights (λ does not apply: the head's loss is the only term here).
    """
    head = model.head
    for parameter in head.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    model.embedder.eval()
    head.train()
    weights = objective.level_weights if objective.level_weights is not None else [1.0] * len(head.levels)
    losses: list[float] = []
    bar = tqdm(total=steps, desc="re-ranker stage", disable=not progress, dynamic_ncols=True)
    sampler = getattr(batches, "batch_sampler", None)
    for epoch in range(10**6, 10**6 + steps):  # fresh passes over the P×K batches, each its own shuffle
        if len(losses) >= steps:
            break
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            sampler.load_state_dict({**sampler.state_dict(), "position": 0})
        before = len(losses)
        for batch in batches:
            pixel_values = batch["pixel_values"].to(device).contiguous(memory_format=torch.channels_last)
            labels = batch["labels"].to(device)
            with torch.no_grad():
                _, embeddings, tokens, _ = model.forward_head_inputs(pixel_values)
            similarities = head(embeddings.float(), tokens.float()).similarities
            loss = sum(w * objective.pair_loss(s.float(), labels) for w, s in zip(weights, similarities) if w > 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(head.parameters(), max_grad_norm)
            optimizer.step()
            schedule.step()
            losses.append(float(loss.item()))
            bar.update(1)
            if len(losses) >= steps:
                break
        if len(losses) == before:
            raise ValueError("the re-ranker stage got no training batch: the sampler yields none")
    bar.close()
    head.eval()
    logger.info("re-ranker stage: %d steps on the selected embedder, head loss %.4f -> %.4f", steps, losses[0],
                losses[-1])  # fmt: skip
    return losses
