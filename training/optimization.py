"""What is trained and how fast: parameter groups with their own learning rates, and frozen BatchNorm."""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning
from .config import TrainingConfig

logger = logging.getLogger(__name__)


def build_optimizer(
    model: CrossMetricForMetricLearning, objective: nn.Module, config: TrainingConfig
) -> torch.optim.Optimizer:
    """AdamW/Adam over four groups: backbone, embedding layer, head, loss parameters (proxies, no weight decay)."""
    groups = [
        {"params": list(model.embedder.backbone.parameters()), "lr": config.backbone_learning_rate},
        {"params": list(model.embedder.embedding.parameters()), "lr": config.learning_rate},
    ]
    if model.head is not None:
        groups.append({"params": list(model.head.parameters()), "lr": config.head_learning_rate})
    loss_parameters = list(objective.parameters())
    if loss_parameters:
        groups.append({"params": loss_parameters, "lr": config.loss_learning_rate, "weight_decay": 0.0})
    groups = [g for g in groups if any(p.requires_grad for p in g["params"])]
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return optimizer_class(groups, lr=config.learning_rate, weight_decay=config.weight_decay)


def batchnorm_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_batchnorm_parameters(model: nn.Module) -> None:
    """BatchNorm affine parameters are not trained (call before DDP wrapping, which must not see them)."""
    for module in batchnorm_layers(model):
        for parameter in module.parameters():
            parameter.requires_grad_(False)


def freeze_unreached_head_parameters(
    model: CrossMetricForMetricLearning, loss_weight: float, level_weights: list[float] | None
) -> list[str]:
    """Freeze the head parameters that no loss term reaches; return their names (call before DDP wrapping).

    Level l's parameters reach the loss through ``S^l`` and every later level. With λ = 0 nothing of the head does,
    and with zero weights on the last levels those levels do not: under DDP such parameters never get a gradient
    and the next step fails ("Expected to have finished reduction ..."). Frozen (``requires_grad=False``), DDP and
    the optimizer leave them out; the objective still reports their levels' losses, computed without gradient.
    """
    head = model.head
    if head is None:
        return []
    weights = level_weights if level_weights is not None else [1.0] * len(head.levels)
    reached = max((index + 1 for index, weight in enumerate(weights) if loss_weight * weight > 0), default=0)
    unreached = [head] if reached == 0 else list(head.levels[reached:])
    frozen = []
    for module in unreached:
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(False)
            frozen.append(name)
    if frozen:
        logger.info("%d head parameters reach no loss term (lambda * w_l = 0): frozen.", len(frozen))
    return frozen


def clip_groups(model: nn.Module, unwrapped: CrossMetricForMetricLearning, detach: bool) -> list[list[nn.Parameter]]:
    """Parameters whose gradient norm is clipped together: all of them, or, with a detached head (``cia_detach``),
    the embedder and the head apart, so that the head's gradient cannot rescale the embedder's: the embedder then
    trains exactly as with the head off. ``model`` may be wrapped (DDP); ``unwrapped`` is the same model unwrapped."""
    if not (detach and unwrapped.head is not None):
        return [list(model.parameters())]
    head = {id(p) for p in unwrapped.head.parameters()}
    parameters = list(model.parameters())
    return [[p for p in parameters if id(p) not in head], [p for p in parameters if id(p) in head]]
