"""Registration with transformers' Auto classes, so that ``AutoModel.from_pretrained`` needs no remote code."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel

from .configuration_crossmetric import CrossMetricConfig
from .modeling_crossmetric import CrossMetricModel


def register_auto_classes() -> None:
    """Map ``model_type="crossmetric"`` to our config and embedder (idempotent)."""
    try:
        AutoConfig.register(CrossMetricConfig.model_type, CrossMetricConfig)
    except ValueError:  # already registered (a second import, or a reload)
        pass
    try:
        AutoModel.register(CrossMetricConfig, CrossMetricModel)
    except ValueError:
        pass
