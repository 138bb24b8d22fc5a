"""Registration with transformers' Auto classes, so that ``AutoModel.from_pretrained`` needs no remote code."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel

from .configuration_crossmetric import CrossMetricConfig
from .modeling_crossmetric import CrossMetricModel
from .reranking_crossmetric import CrossMetricReranker, CrossMetricRerankerConfig


def register_auto_classes() -> None:
    """Map ``model_type="crossmetric"`` to our config and embedder, and ``"crossmetric_reranker"`` to the re-ranker
    (``AutoModel.from_pretrained("EXPORT/reranker")``), idempotently."""
    for config_class, model_class in (
        (CrossMetricConfig, CrossMetricModel),
        (CrossMetricRerankerConfig, CrossMetricReranker),
    ):
        try:
            AutoConfig.register(config_class.model_type, config_class)
        except ValueError:  # already registered (a second import, or a reload)
            pass
        try:
            AutoModel.register(config_class, model_class)
        except ValueError:
            pass
