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

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .cross_image_attention import NEW_LAYER_FLAG, CrossImageAttentionHead, init_new_layer


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
    (:func:`embed_with_tokens`). :meth:`pair_scores` gives, for P pairs, the head's last-level similarity, the
    embedding cosine and the fused score.
    """

    config_class = CrossMetricRerankerConfig
    main_input_name = "embeddings"

    def __init__(self, config: CrossMetricRerankerConfig) -> None:
        super().__init__(config)
        self.head = CrossImageAttentionHead(
            embedding_dim=config.embedding_dim,
            token_dim=config.token_dim,
            width=config.cia_dim,
            num_levels=config.cia_levels,
            num_heads=config.cia_heads,
            mlp_ratio=config.cia_mlp_ratio,
            query=config.cia_query,
            project_tokens=config.token_stage is not None,
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, NEW_LAYER_FLAG, False):
            init_new_layer(module)

    @torch.no_grad()
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
        dtype = self.head.seed.weight.dtype
        pairs = query_embeddings.shape[0]
        embeddings = torch.cat([query_embeddings, candidate_embeddings]).to(dtype)
        tokens = torch.cat([query_tokens, candidate_tokens]).to(dtype)
        first = torch.arange(pairs, device=embeddings.device)
        head = self.head.pair_similarities(embeddings, tokens, first, first + pairs)[-1]
        cosine = F.normalize(query_embeddings.to(dtype), dim=-1) * F.normalize(candidate_embeddings.to(dtype), dim=-1)
        cosine = cosine.sum(dim=-1)
        fused = head + self.config.alpha * cosine if self.config.reranks else cosine
        return {"head": head, "cosine": cosine, "fused": fused}

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
