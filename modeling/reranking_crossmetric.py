"""The cross-image-attention head exported as a re-ranker: retrieve with the embedder, then re-score the top K.

The head's last-level conditional similarity ``S^L[q, c]`` (docs/design.md §1) ranks neighbours better than the
embedding's cosine on some data; the re-ranker ships it next to the embedder (in ``reranker/`` of an export). Its
inputs are what the embedder's single backbone pass gives: the embedding and the tokens of one backbone stage
(:func:`embed_with_tokens`), so a query costs one backbone pass plus 2·K pair states of the head.

Its score fuses the head with the embedding, ``head_similarity + alpha · cosine``, ``alpha`` chosen on the
validation split at training time. When re-ranking did not beat the embedding there, ``config.reranks`` is False
and the score is the cosine alone: the embedding's order is kept where the head has not been shown to help.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .cross_image_attention import NEW_LAYER_FLAG, build_head, init_new_layer
from .image_processing_crossmetric import build_image_processor
from .reranker_inputs import RerankFeatures, embedder_location, features_tensors, gather_inputs, is_features

logger = logging.getLogger(__name__)
SCORES = ("fused", "head", "cosine")
RERANKER_FOLDER = "reranker"  # where a re-ranker lives in an export folder or Hub repo, next to its embedder


class CrossMetricRerankerConfig(PretrainedConfig):
    """Configuration of :class:`CrossMetricReranker`.

    Args:
        embedding_dim: D of the embedder's embedding (the head's level 0 is seeded from it).
        token_dim: channels of the head's tokens.
        token_stage: the backbone module whose output gives the tokens (a timm ``feature_info`` name), or None for the
            embedder's own last tokens.
        cia_levels, cia_heads, cia_dim, cia_mlp_ratio, cia_query: the head's architecture (as in
            :class:`CrossMetricConfig`); ``cia_query`` is ``"other"`` or ``"self"``.
        alpha: the embedding cosine's weight in the fused score ``head_similarity + alpha · cosine``.
        reranks: False when re-ranking did not beat the embedding on the validation split: the fused score is then
            the cosine alone (the embedding's order).
        validation: what the choice was made on (Recall@1 of the embedding, the head alone and the fused score on the
            validation split, the candidates per query, the alphas tried), for the model card.
    """

    model_type = "crossmetric_reranker"

    def __init__(
        self,
        embedding_dim: int = 128,
        token_dim: int = 128,
        token_stage: str | None = None,
        cia_levels: int = 2,
        cia_heads: int = 4,
        cia_dim: int = 128,
        cia_mlp_ratio: float = 2.0,
        cia_query: str = "other",
        alpha: float = 0.0,
        reranks: bool = True,
        validation: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if cia_query not in ("other", "self"):
            raise ValueError(f"CrossMetricRerankerConfig.cia_query={cia_query!r}: a re-ranker needs 'other' or 'self'")
        if cia_levels < 1:
            raise ValueError(f"CrossMetricRerankerConfig.cia_levels={cia_levels}: a re-ranker needs at least 1 level")
        if alpha < 0:
            raise ValueError(f"CrossMetricRerankerConfig.alpha={alpha} must be >= 0")
        self.embedding_dim = embedding_dim
        self.token_dim = token_dim
        self.token_stage = token_stage
        self.cia_levels = cia_levels
        self.cia_heads = cia_heads
        self.cia_dim = cia_dim
        self.cia_mlp_ratio = cia_mlp_ratio
        self.cia_query = cia_query
        self.alpha = float(alpha)
        self.reranks = bool(reranks)
        self.validation = dict(validation or {})
        super().__init__(**kwargs)


class CrossMetricReranker(PreTrainedModel):
    """The head of a model trained with cross-image attention, scoring (query, candidate) pairs.

    Its weights are the training model's ``head.*``; what it scores are the embedder's outputs
    (:func:`embed_with_tokens`). As sentence-transformers' ``CrossEncoder``: :meth:`predict` gives one score per pair
    and :meth:`rank` orders candidates for a query; items are images, image paths or precomputed
    :class:`RerankFeatures` (what an index stores). Images need the embedder: loaded lazily from the export folder
    that holds ``reranker/`` (or passed with ``embedder=`` / :meth:`set_embedder`). :meth:`pair_scores` and
    :meth:`query_scores` give the head's last-level similarity, the embedding cosine and the fused score.
    """

    config_class = CrossMetricRerankerConfig
    main_input_name = "embeddings"

    def __init__(self, config: CrossMetricRerankerConfig) -> None:
        super().__init__(config)
        self.head = build_head(config, config.token_dim, project_tokens=config.token_stage is not None)
        # Plain attributes (a tuple is no nn.Module): the embedder never becomes part of the re-ranker's weights.
        self._attached: tuple[Any, Any] | None = None
        self._embedder_source: tuple[tuple[str, str | None] | None, dict[str, Any]] = (None, {})
        self._fallback_noted = False
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, NEW_LAYER_FLAG, False):
            init_new_layer(module)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *args: Any,
        embedder: nn.Module | None = None,
        image_processor: Any = None,
        **kwargs: Any,
    ) -> CrossMetricReranker:
        """Load a re-ranker (safetensors only): a local ``EXPORT/reranker`` folder, or ``(hub_id,
        subfolder="reranker")``. It remembers where its embedder lives (the export folder or repo root), loaded on the
        first image; or pass ``embedder=`` (a ``CrossMetricModel``) and optionally its ``image_processor``."""
        kwargs.setdefault("use_safetensors", True)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
        model._embedder_source = (embedder_location(pretrained_model_name_or_path, kwargs.get("subfolder")), hub)
        if embedder is not None:
            model.set_embedder(embedder, image_processor)
        return model.eval()

    # -- the embedder (images in) ---------------------------------------------------------------------------------
    def set_embedder(self, embedder: nn.Module, image_processor: Any = None) -> CrossMetricReranker:
        """Use ``embedder`` (the ``CrossMetricModel`` this re-ranker was trained with) for image inputs."""
        dim = getattr(getattr(embedder, "config", None), "embedding_dim", None)
        if dim != self.config.embedding_dim:
            raise ValueError(
                f"the embedder makes {dim}-dimensional embeddings but this re-ranker was trained on "
                f"{self.config.embedding_dim}-dimensional ones: pass the embedder exported next to it."
            )
        if self.config.token_stage is not None:
            try:
                embedder.backbone.get_submodule(self.config.token_stage)
            except AttributeError as error:
                raise ValueError(
                    f"the embedder's backbone has no stage {self.config.token_stage!r}, which gives this re-ranker "
                    "its tokens: pass the embedder exported next to it."
                ) from error
        self._attached = (embedder.eval(), image_processor or build_image_processor(embedder.config))
        return self

    def embedder_and_processor(self) -> tuple[nn.Module, Any]:
        """The embedder and its image processor, loaded on first use from the export that holds this re-ranker."""
        if self._attached is None:
            location, hub = self._embedder_source
            if location is None:
                raise ValueError(
                    "this re-ranker does not know its embedder (it was not loaded from EXPORT/reranker or with "
                    "subfolder='reranker'): pass embedder= to from_pretrained, or call set_embedder(embedder), or "
                    "pass precomputed RerankFeatures instead of images."
                )
            from transformers import AutoImageProcessor, AutoModel

            path, subfolder = location
            options = {**hub, **({"subfolder": subfolder} if subfolder else {})}
            self.set_embedder(
                AutoModel.from_pretrained(path, **options), AutoImageProcessor.from_pretrained(path, **options)
            )
        return self._attached  # type: ignore[return-value]

    @torch.no_grad()
    def _encode_images(self, images: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        embedder, processor = self.embedder_and_processor()
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        _, embeddings, tokens, _ = embed_with_tokens(embedder.to(self.device), pixel_values, self.config.token_stage)
        return embeddings, tokens

    def encode(self, images: Sequence[Any], batch_size: int = 32) -> RerankFeatures:
        """Features (embeddings N×D, tokens N×T×C, float32) of images or paths: one backbone pass each. What an
        index stores per gallery item; pass them to :meth:`predict` / :meth:`rank` instead of the images."""
        return RerankFeatures(*gather_inputs(list(images), self._encode_images, batch_size))

    # -- scores ---------------------------------------------------------------------------------------------------
    def _fuse(self, head: torch.Tensor, cosine: torch.Tensor) -> dict[str, torch.Tensor]:
        fused = head + self.config.alpha * cosine if self.config.reranks else cosine
        return {"head": head, "cosine": cosine, "fused": fused}

    @torch.inference_mode()
    def pair_scores(
        self,
        query_embeddings: torch.Tensor,
        query_tokens: torch.Tensor,
        candidate_embeddings: torch.Tensor,
        candidate_tokens: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Scores of P pairs (query p, candidate p): ``head`` (``S^L``), ``cosine`` and ``fused``, P each.

        Embeddings are P×D (L2-normalised), tokens P×T×C (any float dtype: computed in float32).
        """
        dtype, device = self.head.seed.weight.dtype, self.head.seed.weight.device
        pairs = query_embeddings.shape[0]
        embeddings = torch.cat([query_embeddings, candidate_embeddings]).to(device, dtype)
        tokens = torch.cat([query_tokens, candidate_tokens]).to(device, dtype)
        first = torch.arange(pairs, device=device)
        head = self.head.pair_similarities(embeddings, tokens, first, first + pairs)[-1]
        normalized = F.normalize(embeddings, dim=-1)
        return self._fuse(head, (normalized[:pairs] * normalized[pairs:]).sum(dim=-1))

    @torch.inference_mode()
    def query_scores(
        self,
        query_embedding: torch.Tensor,
        query_tokens: torch.Tensor,
        candidate_embeddings: torch.Tensor,
        candidate_tokens: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """One query (D, T×C) against K candidates (K×D, K×T×C): ``head``, ``cosine`` and ``fused``, K each. The
        query's keys and values are computed once (the cost of re-ranking K stored candidates)."""
        dtype, device = self.head.seed.weight.dtype, self.head.seed.weight.device
        count = candidate_embeddings.shape[0]
        embeddings = torch.cat([query_embedding.reshape(1, -1), candidate_embeddings]).to(device, dtype)
        tokens = torch.cat([query_tokens.unsqueeze(0), candidate_tokens]).to(device, dtype)
        first = torch.zeros(count, dtype=torch.long, device=device)
        head = self.head.pair_similarities(embeddings, tokens, first, torch.arange(1, count + 1, device=device))[-1]
        normalized = F.normalize(embeddings, dim=-1)
        return self._fuse(head, normalized[1:] @ normalized[0])

    def _note_fallback(self) -> None:
        """Log once that this re-ranker keeps the embedding's order (``config.reranks`` False)."""
        if not self.config.reranks and not self._fallback_noted:
            self._fallback_noted = True
            logger.warning("re-ranker off: %s", fallback_message(self.config))

    def predict(self, pairs: Sequence[tuple[Any, Any]], batch_size: int = 32, score: str = "fused") -> Any:
        """One score per ``(query, candidate)`` pair, as a float32 numpy array: ``score`` ``"fused"`` (default,
        ``head + alpha · cosine``, or the cosine alone when the re-ranker keeps the embedding's order), ``"head"``
        (the head's similarity alone), ``"cosine"``, or ``"all"`` (a dict of the three)."""
        if score not in (*SCORES, "all"):
            raise ValueError(f"score={score!r} must be one of {(*SCORES, 'all')}.")
        pairs = list(pairs)
        bad = next((i for i, pair in enumerate(pairs) if not isinstance(pair, (tuple, list)) or len(pair) != 2), None)
        if bad is not None:
            raise ValueError(f"pairs[{bad}] is not a (query, candidate) pair: pass a list of 2-tuples.")
        self._note_fallback()
        parts: dict[str, list[np.ndarray]] = {name: [] for name in SCORES}
        for start in range(0, len(pairs), batch_size):
            items = [item for pair in pairs[start : start + batch_size] for item in pair]
            embeddings, tokens = gather_inputs(items, self._encode_images, batch_size)
            scores = self.pair_scores(embeddings[0::2], tokens[0::2], embeddings[1::2], tokens[1::2])
            for name in SCORES:
                parts[name].append(scores[name].float().cpu().numpy())
        out = {name: np.concatenate(v) if v else np.zeros(0, np.float32) for name, v in parts.items()}
        return out if score == "all" else out[score]

    def rank(self, query: Any, candidates: Any, top_k: int | None = None, batch_size: int = 32) -> list[dict[str, Any]]:
        """``candidates`` ordered for ``query``, best first: ``[{"corpus_id", "score", "head_score", "cosine"}]``.

        ``score`` is the fused score (the cosine alone when the re-ranker keeps the embedding's order: then the order
        is the embedding's, and this is logged once); ``head_score`` the head's similarity alone; ties keep the
        candidates' order. ``candidates`` is a list of items, or the features of all of them at once
        (``RerankFeatures(N×D, N×T×C)``); ``top_k`` keeps the first ``top_k``.
        """
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}.")
        self._note_fallback()
        query_embedding, query_tokens = gather_inputs([query], self._encode_images, 1)
        if is_features(candidates):
            candidate_embeddings, candidate_tokens = features_tensors(candidates)
        else:
            candidate_embeddings, candidate_tokens = gather_inputs(list(candidates), self._encode_images, batch_size)
        if query_tokens.shape[1:] != candidate_tokens.shape[1:]:
            raise ValueError(
                f"the query's tokens are {tuple(query_tokens.shape[1:])} but the candidates' "
                f"{tuple(candidate_tokens.shape[1:])}: compute both with the same model and image size."
            )
        scores = {k: v.float().cpu().numpy() for k, v in self.query_scores(
            query_embedding[0], query_tokens[0], candidate_embeddings, candidate_tokens
        ).items()}  # fmt: skip
        order = np.argsort(-scores["fused"], kind="stable")[:top_k]
        return [
            {"corpus_id": int(i), "score": float(scores["fused"][i]), "head_score": float(scores["head"][i]),
             "cosine": float(scores["cosine"][i])}
            for i in order
        ]  # fmt: skip

    def forward(
        self,
        embeddings: torch.Tensor,
        tokens: torch.Tensor,
        candidate_embeddings: torch.Tensor,
        candidate_tokens: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The fused score of each (query, candidate) pair (see :meth:`pair_scores`)."""
        return self.pair_scores(embeddings, tokens, candidate_embeddings, candidate_tokens)["fused"]


def fallback_message(config: CrossMetricRerankerConfig) -> str:
    """Why a re-ranker with ``reranks`` False keeps the embedding's order, in one sentence."""
    validation = config.validation or {}
    if validation.get("reason"):
        why = validation["reason"]
    elif "recall@1" in validation and "rerank/recall@1" in validation:
        why = (
            f"re-ranking did not beat the embedding on the validation split (Recall@1 {validation['recall@1']:.4f}, "
            f"re-ranked {validation['rerank/recall@1']:.4f})"
        )
    else:
        why = "re-ranking was not shown to beat the embedding on a validation split"
    return f"{why}; its score falls back to the embedding cosine, and rank() keeps the embedding's order."


def embed_with_tokens(
    embedder: nn.Module, pixel_values: torch.Tensor, token_stage: str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int] | None]:
    """One backbone pass of ``embedder`` (a :class:`CrossMetricModel`): its tokens, embeddings, the head's tokens
    (B×T×C') and their grid.

    With a ``token_stage`` its output is captured by a forward hook during the embedder's own, unchanged pass, so the
    embedding is exactly the exported embedder's. The grid is (H', W') of the captured map, or None when the head
    takes the embedder's own tokens.
    """
    captured: list[torch.Tensor] = []
    handle = None
    if token_stage is not None:
        module = embedder.backbone.get_submodule(token_stage)
        handle = module.register_forward_hook(lambda _module, _inputs, output: captured.append(output))
    try:
        tokens, embeddings = embedder(pixel_values, return_dict=False)
    finally:
        if handle is not None:
            handle.remove()
    if not captured:
        return tokens, embeddings, tokens, None
    feature_map = captured[-1]
    if feature_map.dim() != 4:
        raise ValueError(f"stage {token_stage} gave features of shape {tuple(feature_map.shape)}.")
    grid = (int(feature_map.shape[-2]), int(feature_map.shape[-1]))
    return tokens, embeddings, feature_map.flatten(2).transpose(1, 2), grid
