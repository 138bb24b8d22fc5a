"""crossmetric: deep metric learning with Cross-Image-Attention for conditional embeddings.

The public names are imported lazily so that ``import crossmetric`` stays fast and registers the
model with transformers' Auto classes without pulling in the training stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .modeling.configuration_crossmetric import CrossMetricConfig
from .modeling.cross_image_attention import CrossImageAttentionHead
from .modeling.image_processing_crossmetric import build_image_processor
from .modeling.modeling_crossmetric import CrossMetricForMetricLearning, CrossMetricModel
from .modeling.registration import register_auto_classes

__version__ = "0.1.0"

# name -> module (relative to this package) that defines it; loaded on first access.
_LAZY_EXPORTS: dict[str, str] = {
    "retrieval_metrics": ".evaluation.metrics",
    "query_gallery_metrics": ".evaluation.metrics",
    "ClassBalancedBatchSampler": ".data.sampler",
    "load_dml_dataset": ".data.dml_dataset",
    "EmbeddingIndex": ".retrieval.index",
    "ImageRetrievalPipeline": ".retrieval.pipeline",
    "TrainingConfig": ".training.config",
    "CrossMetricTrainer": ".training.trainer",
    "push_to_hub": ".hub.push",
    "CrossMetricReranker": ".modeling.reranking_crossmetric",
    "RerankFeatures": ".modeling.reranker_inputs",
}

__all__ = [
    "CrossImageAttentionHead",
    "CrossMetricConfig",
    "CrossMetricForMetricLearning",
    "build_image_processor",
    "CrossMetricModel",
    "register_auto_classes",
    *_LAZY_EXPORTS,
]

register_auto_classes()


def _register_pipelines() -> None:
    """``pipeline("image-retrieval", ...)`` works after ``import crossmetric``."""
    from .retrieval.pipeline import register_retrieval_pipeline

    register_retrieval_pipeline()


_register_pipelines()


def __getattr__(name: str) -> Any:
    if name in _LAZY_EXPORTS:
        module = importlib.import_module(_LAZY_EXPORTS[name], __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'crossmetric' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from .data.sampler import ClassBalancedBatchSampler  # noqa: F401
    from .evaluation.metrics import query_gallery_metrics, retrieval_metrics  # noqa: F401
