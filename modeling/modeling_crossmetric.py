"""The crossmetric embedder (what is exported) and its training wrapper with the cross-image-attention head.

Modelled on transformers' ``timm_wrapper``: a timm backbone built with ``pretrained=False`` and filled from
safetensors on load, ModelOutput dataclasses, and an ``_init_weights`` that keeps timm's own initialisation.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_crossmetric import CrossMetricConfig
from .cross_image_attention import NEW_LAYER_FLAG, build_head, init_new_layer, mark_new_layers
from .image_processing_crossmetric import build_image_processor
from .multi_similarity import multi_similarity_loss
from .reranking_crossmetric import CrossMetricReranker, CrossMetricRerankerConfig, embed_with_tokens


@dataclass
class CrossMetricModelOutput(ModelOutput):
    """Output of :class:`CrossMetricModel`.

    Attributes:
        last_hidden_state: the backbone tokens X, B×T×C (a CNN map flattened H·W, or a ViT's patch tokens without
            its prefix tokens).
        pooler_output: the L2-normalised embedding, B×D (what retrieval uses).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None


@dataclass
class CrossMetricForMetricLearningOutput(ModelOutput):
    """Output of :class:`CrossMetricForMetricLearning`.

    Attributes:
        loss: with labels, multi-similarity on the unconditional similarities plus lambda · Σ_l w_l · multi-similarity
            on each level's conditional similarities.
        embeddings: the unconditional L2-normalised embeddings, B×D.
        conditional_similarities: one B×B matrix per head level (empty when the head is off).
        last_hidden_state: the backbone tokens, B×T×C.
        attentions: with ``output_attentions``, one B×B×heads×T tensor per level.
    """

    loss: torch.FloatTensor | None = None
    embeddings: torch.FloatTensor | None = None
    conditional_similarities: tuple[torch.FloatTensor, ...] | None = None
    last_hidden_state: torch.FloatTensor | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class CrossMetricPreTrainedModel(PreTrainedModel):
    """Shared loading behaviour: safetensors only, and timm's own initialisation kept."""

    config_class = CrossMetricConfig
    base_model_prefix = "embedder"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        """Initialise only our layers (embedding, head), flagged when built; timm's keep timm's own initialisation.

        Called per module, leaves included (transformers 5 skips parameter-less containers of custom models), and
        only for weights that ``from_pretrained`` did not load. Also resets timm's non-persistent buffers, which
        loading leaves as uninitialised memory (transformers 5).
        """
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
        if getattr(module, NEW_LAYER_FLAG, False):
            init_new_layer(module)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """Load weights from safetensors only. Pickle checkpoints (``pytorch_model.bin``) can run code when loaded;
        they are refused unless ``use_safetensors=False`` is passed explicitly."""
        kwargs.setdefault("use_safetensors", True)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            raise ValueError(
                f"{pretrained_model_name_or_path}: its safetensors weights cannot be read ({error}); the file is "
                "truncated or damaged. Export the model again, or download it again (force_download=True)."
            ) from error
        except ValueError as error:  # e.g. a hand-edited config.json: say which folder
            raise ValueError(f"Loading {pretrained_model_name_or_path}: {error}") from error
        except OSError as error:
            folder = Path(str(pretrained_model_name_or_path))
            if kwargs["use_safetensors"] and folder.is_dir() and any(folder.glob("*.bin")):
                raise OSError(
                    f"{folder} holds pickle weights (*.bin) but no model.safetensors. crossmetric loads only "
                    "safetensors, "
                    "because unpickling a file can run arbitrary code. If you trust this file, pass "
                    "use_safetensors=False to load it anyway, then save_pretrained() to convert it."
                ) from error
            raise


class CrossMetricModel(CrossMetricPreTrainedModel):
    """The embedder: timm backbone → tokens → pooling → linear → L2 normalisation.

    This is what ``from_pretrained`` returns for an exported model and what the ``image-feature-extraction``
    pipeline runs (``pool=True`` gives ``pooler_output``, the embedding). It has no cross-attention parameters: the
    head is used only in training.
    """

    def __init__(self, config: CrossMetricConfig) -> None:
        super().__init__(config)
        self.backbone = _create_backbone(config)
        self.num_prefix_tokens = int(getattr(self.backbone, "num_prefix_tokens", 0))
        self.token_dim = int(self.backbone.num_features)
        self.embedding = nn.Linear(self.token_dim, config.embedding_dim)
        mark_new_layers(self.embedding)
        self.post_init()

    def forward_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backbone tokens B×T×C and, for ViTs, the first prefix (CLS) token B×C."""
        features = self.backbone.forward_features(pixel_values)
        if features.dim() == 4:  # CNN: B×C×H×W (timm's NCHW convention)
            if self.config.pooling == "cls":
                raise ValueError(f"pooling='cls' needs a ViT backbone; {self.config.backbone} is a CNN: use 'avg'.")
            return features.flatten(2).transpose(1, 2), None
        if features.dim() != 3:
            raise ValueError(f"Backbone {self.config.backbone} gave features of shape {tuple(features.shape)}.")
        cls_token = features[:, 0] if self.num_prefix_tokens > 0 else None
        return features[:, self.num_prefix_tokens :], cls_token

    def pool(self, tokens: torch.Tensor, cls_token: torch.Tensor | None) -> torch.Tensor:
        """Pool B×T×C tokens into B×C according to ``config.pooling``."""
        pooling = self.config.pooling
        if pooling in ("avg", "mean"):
            return tokens.mean(dim=1)
        if pooling == "gem":
            p = self.config.gem_p
            return tokens.float().clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p).to(tokens.dtype)
        if pooling == "max+avg":
            return tokens.amax(dim=1) + tokens.mean(dim=1)
        if cls_token is None:
            raise ValueError(f"pooling='cls' needs a backbone with a CLS token; {self.config.backbone} has none.")
        return cls_token

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool | None = None, **kwargs: Any
    ) -> CrossMetricModelOutput | tuple[torch.Tensor, torch.Tensor]:
        """Embed a batch of preprocessed images (B×3×H×W)."""
        tokens, cls_token = self.forward_tokens(pixel_values)
        embedding = F.normalize(self.embedding(self.pool(tokens, cls_token)), dim=-1)
        if return_dict is False:
            return tokens, embedding
        return CrossMetricModelOutput(last_hidden_state=tokens, pooler_output=embedding)


class CrossMetricForMetricLearning(CrossMetricPreTrainedModel):
    """The embedder plus the training-only cross-image-attention head (``config.cia_levels`` levels; none for 0).

    Training checkpoints hold all of it; :meth:`save_embedder` exports the embedder alone.
    """

    def __init__(self, config: CrossMetricConfig) -> None:
        super().__init__(config)
        self.embedder = CrossMetricModel(config)
        self.head_token_stage: str | None = None  # a backbone module name (not the module: no duplicate weights)
        self.head = None
        if config.cia_levels > 0:
            self.head_token_stage, head_token_dim = head_token_source(self.embedder.backbone, config.cia_token_stride)
            token_dim = head_token_dim if self.head_token_stage else self.embedder.token_dim
            self.head = build_head(config, token_dim, project_tokens=self.head_token_stage is not None)
        self.post_init()

    def forward_head_inputs(
        self, pixel_values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int] | None]:
        """One backbone pass: the embedder's tokens and embeddings, the head's tokens (B×T×C') and their grid.

        With a ``head_token_stage`` its output is captured by a forward hook during the embedder's own, unchanged
        pass (timm's ``feature_info`` names the module), so the exported embedder computes exactly what it computes
        here. The grid is (H', W') of the captured map, or None when the head takes the embedder's own tokens.
        """
        return embed_with_tokens(self.embedder, pixel_values, self.head_token_stage)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_attentions: bool = False,
        return_dict: bool | None = None,
        skip_head: bool = False,
        **kwargs: Any,
    ) -> CrossMetricForMetricLearningOutput:
        """Unconditional embeddings, per-level conditional similarities and, with labels, the CIA loss.

        ``skip_head`` leaves the head out (no conditional similarities): the embedder's phase of a run whose head
        trains afterwards, on the finished embedder."""
        tokens, embeddings, head_tokens, _ = self.forward_head_inputs(pixel_values)
        similarities: tuple[torch.Tensor, ...] = ()
        attentions = None
        if self.head is not None and not skip_head:
            if self.config.cia_detach:  # the head's loss trains the head alone (docs/design.md §1)
                head_output = self.head(embeddings.detach(), head_tokens.detach(), output_attentions=output_attentions)
            else:
                head_output = self.head(embeddings, head_tokens, output_attentions=output_attentions)
            similarities, attentions = head_output.similarities, head_output.attentions
        loss = None
        if labels is not None:
            loss = multi_similarity_loss(embeddings @ embeddings.T, labels)
            for weight, level_similarities in zip(self.config.level_weights, similarities):
                loss = loss + self.config.cia_loss_weight * weight * multi_similarity_loss(level_similarities, labels)
        return CrossMetricForMetricLearningOutput(
            loss=loss,
            embeddings=embeddings,
            conditional_similarities=similarities,
            last_hidden_state=tokens,
            attentions=attentions,
        )

    def to_reranker(self, alpha: float = 0.0, reranks: bool = True, validation: dict | None = None):
        """The head as a :class:`CrossMetricReranker` (a copy of its weights), with the fusion chosen on validation."""
        if self.head is None or self.head.query_mode == "shuffled":
            raise ValueError(
                "only a model trained with the head (cia_levels > 0) and cia_query 'other' or 'self' has a re-ranker"
            )
        token_dim = self.head.levels[0].token_norm.normalized_shape[0]
        if self.head.token_projection is not None:
            token_dim = self.head.token_projection.in_features
        config = CrossMetricRerankerConfig(
            embedding_dim=self.config.embedding_dim, token_dim=token_dim, token_stage=self.head_token_stage,
            cia_levels=self.config.cia_levels, cia_heads=self.config.cia_heads, cia_dim=self.config.cia_dim,
            cia_mlp_ratio=self.config.cia_mlp_ratio, cia_query=self.config.cia_query, alpha=alpha, reranks=reranks,
            validation=validation,
        )  # fmt: skip
        reranker = CrossMetricReranker(config)
        reranker.head.load_state_dict(self.head.state_dict())
        return reranker.eval()

    def save_embedder(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
        """Export the embedder alone (no head weights) with its image processor and remote code, atomically.

        Writes ``model.safetensors``, ``config.json`` (``architectures: ["CrossMetricModel"]``, an ``auto_map`` for
        ``trust_remote_code``) and ``preprocessor_config.json`` into a temporary sibling folder, then swaps it in, so
        an interrupted export leaves the previous one readable and unchanged.
        """
        return save_embedder(self.embedder, save_directory, **kwargs)


def save_embedder(
    embedder: CrossMetricModel,
    save_directory: str | os.PathLike,
    extra_files: dict[str, str] | None = None,
    write_extra: Callable[[Path], object] | None = None,
    **kwargs: Any,
) -> Path:
    """Export ``embedder`` to ``save_directory`` atomically (see :meth:`CrossMetricForMetricLearning.save_embedder`).

    ``extra_files`` (name -> text, e.g. the model card ``README.md`` and ``metrics.json``) are written into the same
    staging folder, so they appear together with the weights or not at all; so does whatever ``write_extra`` writes
    into the staging folder it is given (e.g. ``reranker/``).
    """
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    original_config = embedder.config
    try:
        embedder.config = copy.deepcopy(original_config)
        embedder.config.architectures = ["CrossMetricModel"]
        CrossMetricConfig.register_for_auto_class()
        CrossMetricModel.register_for_auto_class("AutoModel")
        embedder.save_pretrained(staging, safe_serialization=True, **kwargs)
        build_image_processor(embedder.config).save_pretrained(staging)
        for name, text in (extra_files or {}).items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"extra file name {name!r} must be a plain file name inside the export folder.")
            (staging / name).write_text(text, encoding="utf-8")
        if write_extra is not None:
            write_extra(staging)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        embedder.config = original_config
    return target


def replace_directory(staging: Path, target: Path) -> None:
    """Swap ``staging`` into ``target``: the old folder is moved aside first and removed only after the swap.

    Shared by every atomic folder write (exports here, retrieval indexes in ``training/index_files.py``)."""
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(target, backup)
    os.replace(staging, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def head_token_source(backbone: nn.Module, stride: int) -> tuple[str | None, int]:
    """``(module name, channels)`` of the deepest timm ``feature_info`` stage with a stride of at most ``stride``.

    ``(None, 0)`` means the embedder's own last tokens: for ``stride`` 0, when that stage is the last one (a ViT's
    blocks all share one stride), or for a backbone without ``feature_info``.
    """
    info = getattr(backbone, "feature_info", None)
    if stride == 0 or not info:
        return None, 0
    stages = [dict(stage) for stage in info]  # timm: a list of {"module", "num_chs", "reduction"} per stage
    reductions = [int(stage["reduction"]) for stage in stages]
    finer = [index for index, reduction in enumerate(reductions) if reduction <= stride]
    if not finer:
        raise ValueError(
            f"CrossMetricConfig.cia_token_stride={stride} is finer than every stage of the backbone (strides "
            f"{reductions}); pick one of them, or 0 for the last feature map."
        )
    index = finer[-1]
    if index == len(reductions) - 1 or reductions[index] == reductions[-1]:
        return None, 0
    return str(stages[index]["module"]), int(stages[index]["num_chs"])


def _create_backbone(config: CrossMetricConfig) -> nn.Module:
    """The timm backbone without classifier or pooling, built with ``pretrained=False`` (weights come on load)."""
    name = config.backbone
    if not name.startswith("hf-hub:") and not timm.is_model(name):
        raise ValueError(
            f"CrossMetricConfig.backbone={name!r} is not a timm model. Pick one of timm.list_models(), e.g. "
            "'tf_efficientnet_lite0', 'resnet50', 'vit_small_patch16_224' (or 'test_resnet' for tests)."
        )
    kwargs = dict(config.backbone_kwargs)
    kwargs.setdefault("num_classes", 0)
    kwargs.setdefault("global_pool", "")
    return timm.create_model(name, pretrained=False, **kwargs)
