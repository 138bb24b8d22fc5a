"""What is trained and how fast: parameter groups with their own learning rates, and frozen BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning
from .config import TrainingConfig


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
