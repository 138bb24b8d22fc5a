"""Configuration of a crossmetric embedder and its training-only cross-image-attention head."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from transformers import PretrainedConfig
from transformers.utils import logging

logger = logging.get_logger(__name__)

POOLINGS = ("avg", "gem", "max+avg", "cls", "mean")
CIA_QUERIES = ("other", "self", "shuffled")
INTERPOLATIONS = ("lanczos", "bilinear", "bicubic", "nearest")
# The resize filter of new models, in place of timm's "bicubic": transformers.js (Node, sharp) resizes an image as
# PIL does (antialiased, the kernel widened by the downscale factor) only for Lanczos; its bilinear, bicubic and
# nearest are point-sampled affine transforms, so an exported model embedding an 80 px image at 64 px got a cosine
# of 0.93 to the Python embedding with bicubic and 0.997 with Lanczos. PIL's Lanczos and bicubic differ by under one
# grey level on average, so timm's pretrained weights see practically the images they were trained on.
DEFAULT_INTERPOLATION = "lanczos"
# The fields of the training-only cross-image-attention head. A run that starts from a saved model keeps that
# model's embedder fields and takes these from its training configuration (the trainer, the evaluate command's
# checkpoint loading and export all use this one list).
HEAD_FIELDS = (
    "cia_levels",
    "cia_heads",
    "cia_dim",
    "cia_mlp_ratio",
    "cia_dropout",
    "cia_query",
    "cia_loss_weight",
    "cia_level_weights",
    "cia_token_stride",
    "cia_detach",
)


def _default_preprocessing(backbone: str) -> dict[str, Any]:
    """The timm pretrained data config of ``backbone`` (input size, mean, std, crop), resized with Lanczos."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(backbone.split("hf-hub:")[-1], allow_unregistered=True)
    except Exception:  # noqa: BLE001 - any lookup failure falls back to ImageNet defaults
        cfg = None
    cfg = cfg.to_dict() if cfg is not None and hasattr(cfg, "to_dict") else {}
    return {
        "image_size": int(cfg.get("input_size", (3, 224, 224))[-1]),
        "image_mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
        "image_std": list(cfg.get("std", (0.229, 0.224, 0.225))),
        "interpolation": DEFAULT_INTERPOLATION,  # not timm's (bicubic): see DEFAULT_INTERPOLATION
        "crop_pct": float(cfg.get("crop_pct", 0.875) or 0.875),
    }


class CrossMetricConfig(PretrainedConfig):
    r"""Configuration of :class:`CrossMetricModel` and :class:`CrossMetricForMetricLearning`.

    The embedder is a timm backbone, a pooling layer and a linear layer giving an L2-normalised embedding of size
    ``embedding_dim``. The cross-image-attention (CIA) head exists only in training: it conditions the embedding of
    image *i* on image *j* through ``cia_levels`` levels of cross-attention into *i*'s feature map (Kotovenko et al.,
    CVPR 2023) and is never exported.

    Args:
        backbone: any timm model name (``"resnet50"``, ``"tf_efficientnet_lite0"``, ``"vit_small_patch16_224"``,
            ``"test_resnet"``), built with ``pretrained=False`` and filled from safetensors on load.
        backbone_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``{"img_size": 64}`` for a ViT).
        image_size, image_mean, image_std, interpolation, crop_pct: the preprocessing that travels with the weights;
            unset fields are taken from timm's pretrained config of the backbone, except ``interpolation``, which
            defaults to ``DEFAULT_INTERPOLATION`` (Lanczos, the filter transformers.js reproduces).
        embedding_dim: size D of the exported embedding.
        pooling: ``"avg"``, ``"gem"`` or ``"max+avg"`` for CNNs; ``"cls"`` or ``"mean"`` for ViTs.
        gem_p: the GeM exponent.
        cia_levels: number of conditional levels L; 0 switches the head off (the baseline).
        cia_heads: attention heads per level; ``cia_dim`` must be divisible by it.
        cia_dim: head width d.
        cia_mlp_ratio: MLP hidden width as a multiple of d.
        cia_dropout: dropout on attention weights and in the MLP.
        cia_query: ``"other"``: the query asking image *i* is the other image's embedding (the paper's reading);
            ``"self"``: it is *i*'s own, so nothing depends on the partner (the no-conditioning control: an
            attention-pooling auxiliary loss); ``"shuffled"``: it is a random third image's, drawn anew every forward
            pass (the control for "any second image helps": same parameters, same cost, never the partner).
        cia_loss_weight: lambda, the weight of the conditional losses against the base loss.
        cia_level_weights: per-level weights w_l (length L); ``None`` weighs every level 1.
        cia_token_stride: where the head's keys and values come from: the deepest backbone stage (timm's
            ``feature_info``) whose stride is at most this many pixels, through a learned projection to ``cia_dim``
            in the head. 16 gives a 4×4 grid at 64 px for EfficientNet/ResNet (their last map is 2×2 there, too
            coarse for "which parts" to mean anything). 0, or a stride at least the last stage's, takes the last
            feature map (the exported embedder's own tokens, no projection: the behaviour before this field).
            Training only: the exported embedder is the same for every value.
        cia_detach: the head sees detached tokens and embeddings, so its pair loss trains the head alone and never
            the backbone or the embedding layer (the embedder then trains as with the head off; the head is a
            re-ranker, and reaches the embedding only through a transfer term, if one is set).
        projection_dim: always equal to ``embedding_dim``, written to ``config.json`` because sentence-transformers
            reads the embedding size of a ``pooler_output`` model from ``projection_dim``.
    """

    model_type = "crossmetric"

    def __init__(
        self,
        backbone: str = "tf_efficientnet_lite0",
        backbone_kwargs: dict[str, Any] | None = None,
        image_size: int | None = None,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        embedding_dim: int = 128,
        pooling: str = "avg",
        gem_p: float = 3.0,
        cia_levels: int = 2,
        cia_heads: int = 4,
        cia_dim: int = 128,
        cia_mlp_ratio: float = 2.0,
        cia_dropout: float = 0.0,
        cia_query: str = "other",
        cia_loss_weight: float = 1.0,
        cia_level_weights: list[float] | None = None,
        cia_token_stride: int = 16,
        cia_detach: bool = False,
        projection_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check("backbone", backbone, lambda v: isinstance(v, str) and v.strip() != "", "a timm model name")
        defaults = _default_preprocessing(backbone)
        self.backbone = backbone
        self.backbone_kwargs = dict(backbone_kwargs or {})
        self.image_size = image_size if image_size is not None else defaults["image_size"]
        self.image_mean = list(image_mean) if image_mean is not None else defaults["image_mean"]
        self.image_std = list(image_std) if image_std is not None else defaults["image_std"]
        self.interpolation = interpolation if interpolation is not None else defaults["interpolation"]
        self.crop_pct = crop_pct if crop_pct is not None else defaults["crop_pct"]
        self.embedding_dim = embedding_dim
        self.pooling = pooling
        self.gem_p = gem_p
        self.cia_levels = cia_levels
        self.cia_heads = cia_heads
        self.cia_dim = cia_dim
        self.cia_mlp_ratio = cia_mlp_ratio
        self.cia_dropout = cia_dropout
        self.cia_query = cia_query
        self.cia_loss_weight = cia_loss_weight
        self.cia_level_weights = list(cia_level_weights) if cia_level_weights is not None else None
        self.cia_token_stride = cia_token_stride
        self.cia_detach = cia_detach
        self.projection_dim = embedding_dim if projection_dim is None else projection_dim
        self._validate()
        super().__init__(**kwargs)

    def _validate(self) -> None:
        """Refuse invalid values here, in ``__init__``, naming the field.

        Here, because transformers 5's ``@strict`` validators would wrap a later error in another exception type.
        """
        positive_int = "a positive integer"
        rules: list[tuple[str, Callable[[Any], bool], str]] = [
            ("backbone_kwargs", lambda v: isinstance(v, dict), "a dict"),
            ("image_size", lambda v: _is_int(v) and v > 0, "a positive number of pixels"),
            ("image_mean", _is_rgb_triple, "three numbers, one per RGB channel"),
            ("image_std", lambda v: _is_rgb_triple(v) and all(x > 0 for x in v), "three positive numbers"),
            ("interpolation", lambda v: v in INTERPOLATIONS, f"one of {INTERPOLATIONS}"),
            ("crop_pct", lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
            ("embedding_dim", lambda v: _is_int(v) and v > 0, positive_int),
            ("pooling", lambda v: v in POOLINGS, f"one of {POOLINGS}"),
            ("gem_p", lambda v: v > 0, "a positive exponent"),
            ("cia_levels", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 switches the head off)"),
            ("cia_heads", lambda v: _is_int(v) and v > 0, positive_int),
            ("cia_dim", lambda v: _is_int(v) and v > 0, positive_int),
            ("cia_dim", lambda v: v % self.cia_heads == 0, f"divisible by cia_heads={self.cia_heads}"),
            ("cia_mlp_ratio", lambda v: v > 0, "a positive number"),
            ("cia_dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
            ("cia_query", lambda v: v in CIA_QUERIES, f"one of {CIA_QUERIES}"),
            ("cia_loss_weight", lambda v: v >= 0, "a number >= 0"),
            (
                "cia_level_weights",
                lambda v: v is None or (len(v) == self.cia_levels and all(w >= 0 for w in v)),
                f"None or a list of cia_levels={self.cia_levels} weights >= 0",
            ),
            ("cia_token_stride", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: the last feature map)"),
            ("cia_detach", lambda v: isinstance(v, bool), "True or False"),
            ("projection_dim", lambda v: v == self.embedding_dim, f"equal to embedding_dim={self.embedding_dim}"),
        ]
        for field, is_valid, expected in rules:
            _check(field, getattr(self, field), is_valid, expected)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> CrossMetricConfig:
        """Build from a ``config.json`` dict; refuse another model type, warn about fields we do not know.

        transformers only warns when a folder of another model type is loaded into this class, and then every
        weight stays randomly initialised: a silent garbage model, so that is an error here.
        """
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            raise ValueError(
                f"config.json has model_type={model_type!r}: this folder holds another kind of model, not a "
                f"{cls.model_type} model (loading it as one would leave every weight random). Pass a folder written "
                "by crossmetric (an export or a training checkpoint)."
            )
        unknown = sorted(set(config_dict) - _known_fields(cls))
        if unknown:
            logger.warning(
                f"config.json has fields that {cls.__name__} does not know and ignores: {unknown}. Check them for "
                "typos, or upgrade crossmetric if a newer version wrote this file."
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing that travels with the weights, as the data transforms take it."""
        return {
            "image_size": self.image_size,
            "image_mean": tuple(self.image_mean),
            "image_std": tuple(self.image_std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }

    @property
    def level_weights(self) -> list[float]:
        """w_l for every level (1.0 each unless configured)."""
        return list(self.cia_level_weights) if self.cia_level_weights is not None else [1.0] * self.cia_levels


@functools.cache
def _known_fields(config_class: type) -> frozenset[str]:
    """Our ``__init__`` arguments, the fields every transformers config writes, and keys the Hub tools add."""
    ours = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    extra = {"auto_map", "custom_pipelines", "torch_dtype", "name_or_path", "_commit_hash", "attn_implementation"}
    return frozenset(ours | set(PretrainedConfig().to_dict()) | extra)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_rgb_triple(value: Any) -> bool:
    return len(value) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)


def _check(field: str, value: Any, is_valid: Callable[[Any], bool], expected: str) -> None:
    try:
        ok = bool(is_valid(value))
    except (TypeError, ValueError):  # e.g. a string where a number belongs, from a hand-edited config.json
        ok = False
    if not ok:
        raise ValueError(f"CrossMetricConfig.{field}={value!r} is invalid: it must be {expected}.")
