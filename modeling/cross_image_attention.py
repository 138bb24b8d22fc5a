"""The training-only cross-image-attention head: a hierarchy of conditional embeddings.

Kotovenko et al., CVPR 2023; the paper's details are reconstructed as described in the crossmetric repository's
docs/design.md §1.

For every ordered pair (i, j) of a batch, the embedding of image i conditioned on image j is refined level by level:
the other image's current conditional embedding asks, through cross-attention, which of image i's feature-map tokens
matter for this comparison. The per-level pair similarity ``S^l[i, j] = cos(z^l_{i|j}, z^l_{j|i})`` is what the loss
sees; its gradient reaches the feature map through attention rather than through pooling.

Cost (why the code is shaped this way): keys and values are projected once per image (B·T·C·d), and only the
B² pair queries go through attention and the MLP (B²·T·d + B²·d²). Tokens are never copied B² times before a
projection; level 1's queries are per image, since z⁰ does not depend on the partner yet. On small token grids the
query and output projections are folded into each image's keys and values (B²·heads·T·d instead of B²·d² per
projection; see :meth:`CrossAttentionLevel.folds_projections`): at the default recipe (4×4 tokens, 4 heads,
d = 128) that cut the head's CPU time by 8–12 % (quiet machine, 1 or 2 threads). ``scaled_dot_product_attention``
is not used: the folded path needs the attention weights themselves, and the attention products are a few per cent
of the head here (the pair MLP is most of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CrossImageAttentionOutput:
    """The head's result for one batch.

    Attributes:
        similarities: one B×B matrix per level, ``S^l[i, j] = cos(z^l_{i|j}, z^l_{j|i})`` (symmetric; the diagonal,
            an image compared with itself, is set to 1 and ignored by pair losses).
        attentions: when asked for, one B×B×heads×T tensor per level: how much the query of pair (i, j) attends to
            each of image i's tokens.
    """

    similarities: tuple[torch.Tensor, ...]
    attentions: tuple[torch.Tensor, ...] | None = None


class CrossAttentionLevel(nn.Module):
    """One level: ``z <- z + CrossAttn(query, keys = values = X_i)``, then ``z <- z + MLP(LN(z))`` (pre-LN)."""

    def __init__(self, token_dim: int, width: int, num_heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.query_norm = nn.LayerNorm(width)
        self.token_norm = nn.LayerNorm(token_dim)
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(token_dim, 2 * width)
        self.out = nn.Linear(width, width)
        self.attention_dropout = nn.Dropout(dropout)
        self.mlp_norm = nn.LayerNorm(width)
        hidden = max(1, int(round(width * mlp_ratio)))
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width), nn.Dropout(dropout)
        )

    def keys_values(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image keys and values, B×T×heads×head_dim each: computed once per image, shared by all its pairs."""
        batch, num_tokens, _ = tokens.shape
        kv = self.key_value(self.token_norm(tokens)).view(batch, num_tokens, 2, self.num_heads, self.head_dim)
        return kv[:, :, 0], kv[:, :, 1]

    def folds_projections(self, num_tokens: int) -> bool:
        """Whether the pair part is cheaper with the query and output projections folded into each image's keys and
        values (heads·T·d per pair) than applied to every pair (d² + T·d per pair): so when heads·T < T + d.

        Both are exact rewrites of the same function (``q·k = z·(W_qᵀk) + b_q·k``, ``W_o Σ_t w_t v_t = Σ_t w_t
        W_o v_t``); only the cost differs. A 4×4 grid with 4 heads and d = 128 folds (64 < 144); an 8×8 grid does not.
        """
        return self.num_heads * num_tokens < num_tokens + self.num_heads * self.head_dim

    def forward(
        self,
        state: torch.Tensor,
        query_source: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        per_image_query_asker: str | torch.Tensor = "partner",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Refine the pair states.

        Args:
            state: ``z^{l-1}_{i|j}``, B×B×d, or B×d when it does not depend on the partner j yet (level 0).
            query_source: what asks image i for pair (i, j): B×B×d indexed [i, j], or B×d when it is per image (the
                first level), indexed by the partner j (``per_image_query_asker="partner"``), by i itself ("self"),
                or by a B×B index tensor (image ``asker[i, j]``'s query asks for pair (i, j): the shuffled control).
                A per-image query is projected once per image and only then spread over the pairs.
            keys, values: image i's tokens projected, B×T×heads×head_dim.

        Returns:
            ``z^l_{i|j}`` (B×B×d) and the attention weights (B×B×heads×T).
        """
        batch, num_tokens = keys.shape[:2]
        fold = self.folds_projections(num_tokens)
        scale = self.head_dim**-0.5
        source = self.query_norm(query_source)
        asker = per_image_query_asker
        if source.dim() == 3 and fold:  # B² pair queries: fold W_q into each image's keys instead of projecting them
            weight = self.query.weight.view(self.num_heads, self.head_dim, -1)  # (heads, head_dim, d)
            scaled_keys = keys * scale
            folded_keys = torch.einsum("ithc,hcd->idht", scaled_keys, weight)  # B×d×heads×T, once per image
            key_bias = torch.einsum("ithc,hc->iht", scaled_keys, self.query.bias.view(self.num_heads, -1))
            logits = torch.baddbmm(key_bias.flatten(1)[:, None], source, folded_keys.flatten(2))
            logits = logits.view(batch, batch, self.num_heads, num_tokens)
        elif source.dim() == 3:
            query = self.query(source).view(batch, batch, self.num_heads, self.head_dim)
            logits = torch.einsum("ijhc,ithc->ijht", query * scale, keys)
        else:  # a per-image query: projected once per image, then spread over the pairs
            query = (self.query(source) * scale).view(batch, self.num_heads, self.head_dim)
            if isinstance(asker, torch.Tensor):  # q[asker[i, j]] asks image i
                logits = torch.einsum("ijhc,ithc->ijht", query[asker], keys)
            elif asker == "partner":  # q[j] asks image i, for all pairs (i, j)
                logits = torch.einsum("jhc,ithc->ijht", query, keys)
            else:  # q[i] asks image i: the same for every partner j
                logits = torch.einsum("ihc,ithc->iht", query, keys)[:, None].expand(-1, batch, -1, -1)
        if token_mask is not None:
            logits = logits.masked_fill(~token_mask[:, None, None, :], float("-inf"))
        weights = logits.softmax(dim=-1)
        dropped = self.attention_dropout(weights)
        if state.dim() == 2:
            state = state[:, None, :]  # z⁰_{i|j} = z⁰_i for every partner j
        if fold:  # W_o folded into each image's values (B×(heads·T)×d); residual and product in one batched op
            out_weight = self.out.weight.view(-1, self.num_heads, self.head_dim)  # (d, heads, head_dim)
            folded_values = torch.einsum("ithc,dhc->ihtd", values, out_weight).flatten(1, 2)
            state = torch.baddbmm(state + self.out.bias, dropped.flatten(2), folded_values)
        else:
            attended = torch.einsum("ijht,ithc->ijhc", dropped, values)
            state = state + self.out(attended.reshape(batch, batch, -1))
        state = state + self.mlp(self.mlp_norm(state))
        return state, weights

    def forward_pairs(
        self, state: torch.Tensor, query_source: torch.Tensor, tokens: torch.Tensor, owners: torch.Tensor
    ) -> torch.Tensor:
        """The same update for a list of P pairs instead of a whole B×B batch (re-ranking a few neighbours).

        ``state`` and ``query_source`` are P×d; ``tokens`` (N×T×C) are the images' tokens and ``owners`` (P) the image
        each pair's state belongs to. With few pairs per image the key and value projections are folded into the pairs
        instead of applied to every token (an exact rewrite): the query asks the normalised tokens through
        ``W_kᵀ q`` (the key bias adds the same logit to every token, which the softmax cancels), and the attention
        pools the tokens before ``W_v`` (the weights sum to one, so the value bias passes as it is). Per level that is
        P·heads·(T + 2·head_dim)·C instead of N·T·2d·C.
        """
        pairs = state.shape[0]
        query = self.query(self.query_norm(query_source)).view(pairs, self.num_heads, self.head_dim)
        key_weight, value_weight = self.key_value.weight.view(2, self.num_heads, self.head_dim, -1)
        value_bias = self.key_value.bias.view(2, self.num_heads, self.head_dim)[1]
        asking = torch.einsum("phc,hcx->phx", query * self.head_dim**-0.5, key_weight)  # P×heads×C
        own = self.token_norm(tokens)[owners]  # P×T×C
        weights = torch.einsum("phx,ptx->pht", asking, own).softmax(dim=-1)
        pooled = torch.einsum("pht,ptx->phx", weights, own)
        attended = torch.einsum("phx,hcx->phc", pooled, value_weight) + value_bias
        state = state + self.out(attended.reshape(pairs, -1))
        return state + self.mlp(self.mlp_norm(state))


class CrossImageAttentionHead(nn.Module):
    """Hierarchy of conditional embeddings over a batch, used only while training (never exported).

    Args:
        embedding_dim: D, the size of the unconditional embedding ``e_i`` that seeds level 0.
        token_dim: C, the channel size of the backbone tokens ``X_i``.
        width: d, the head width.
        num_levels: L >= 1.
        num_heads: attention heads per level.
        mlp_ratio: MLP hidden width as a multiple of d.
        dropout: dropout on attention weights and in the MLP.
        query: ``"other"`` (``z^{l-1}_{j|i}`` asks image i: the method), ``"self"`` (``z^{l-1}_{i|j}`` asks it: no
            dependence on the partner, the no-conditioning control) or ``"shuffled"`` (``z^{l-1}_{k|i}`` asks it, k a
            random third image of the batch drawn per forward pass: the "any second image" control).
        project_tokens: project the tokens to ``width`` once per image (a learned ``token_projection``) before the
            levels; used when the tokens come from an earlier backbone stage than the embedder's own.
    """

    def __init__(
        self,
        embedding_dim: int,
        token_dim: int,
        width: int = 128,
        num_levels: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        dropout: float = 0.0,
        query: str = "other",
        project_tokens: bool = False,
    ) -> None:
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"CrossImageAttentionHead needs num_levels >= 1, got {num_levels}; use no head for 0.")
        if query not in ("other", "self", "shuffled"):
            raise ValueError(f"CrossImageAttentionHead query={query!r} must be 'other', 'self' or 'shuffled'.")
        self.query_mode = query
        self.seed = nn.Linear(embedding_dim, width)  # P: z⁰_{i|j} = P(e_i)
        self.token_projection = nn.Linear(token_dim, width) if project_tokens else None
        level_token_dim = width if project_tokens else token_dim
        self.levels = nn.ModuleList(
            CrossAttentionLevel(level_token_dim, width, num_heads, mlp_ratio, dropout) for _ in range(num_levels)
        )

        mark_new_layers(self)

    def reset_parameters(self) -> None:
        """Explicit initialisation: transformers 5's ``from_pretrained`` leaves unloaded weights uninitialised."""
        for module in self.modules():
            init_new_layer(module)

    def forward(
        self,
        embeddings: torch.Tensor,
        tokens: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        partners: torch.Tensor | None = None,
    ) -> CrossImageAttentionOutput:
        """Conditional similarities of every ordered pair of the batch.

        Args:
            embeddings: the unconditional embeddings ``e``, B×D.
            tokens: the backbone tokens ``X``, B×T×C.
            token_mask: optional B×T boolean mask of valid tokens.
            output_attentions: also return the B×B×heads×T attention weights of every level.
            partners: ``"shuffled"`` mode only: the B×B index of the image k that asks image i for pair (i, j);
                drawn with :func:`random_third_images` (torch's global RNG) when not given.
        """
        if embeddings.shape[0] != tokens.shape[0]:
            raise ValueError(f"embeddings ({embeddings.shape[0]}) and tokens ({tokens.shape[0]}) differ in batch size.")
        batch = embeddings.shape[0]
        if self.token_projection is not None:
            tokens = self.token_projection(tokens)  # once per image, shared by every level and pair
        if self.query_mode == "shuffled" and partners is None:
            partners = random_third_images(batch, embeddings.device)
        rows = torch.arange(batch, device=embeddings.device)[:, None]
        state: torch.Tensor = self.seed(embeddings)  # B×d: level 0 does not depend on the partner
        similarities: list[torch.Tensor] = []
        attentions: list[torch.Tensor] = []
        eye = torch.eye(batch, dtype=torch.bool, device=embeddings.device)
        for level in self.levels:
            keys, values = level.keys_values(tokens)
            asker: str | torch.Tensor = "self" if self.query_mode == "self" else "partner"
            query_source = state  # B×d per image at the first level, or z_{i|j} itself in "self" mode
            if self.query_mode == "other" and state.dim() == 3:
                query_source = state.transpose(0, 1)  # pair (i, j) is asked by z_{j|i}
            elif self.query_mode == "shuffled" and state.dim() == 3:
                query_source = state[partners, rows]  # pair (i, j) is asked by z_{k|i}, k = partners[i, j]
            elif self.query_mode == "shuffled":
                asker = partners
            state, weights = level(state, query_source, keys, values, token_mask, per_image_query_asker=asker)
            similarities.append(pair_cosine(state).masked_fill(eye, 1.0))
            if output_attentions:
                attentions.append(weights)
        return CrossImageAttentionOutput(tuple(similarities), tuple(attentions) if output_attentions else None)

    def pair_similarities(
        self, embeddings: torch.Tensor, tokens: torch.Tensor, first: torch.Tensor, second: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """``S^l[a, b]`` of P listed pairs only (``first[p], second[p]`` index ``embeddings``/``tokens``), per level.

        Equal to the batched :meth:`forward`'s entries, at 2·P pair states instead of B² (re-ranking a query's
        nearest neighbours). Not defined for ``"shuffled"``, whose third image is drawn from a whole batch.
        """
        if self.query_mode == "shuffled":
            raise ValueError("pair similarities need cia_query 'other' or 'self'; 'shuffled' draws from a batch.")
        if self.token_projection is not None:
            tokens = self.token_projection(tokens)
        pairs = first.shape[0]
        owners = torch.cat([first, second])  # both directions as one list of 2·P states: [z_{a|b}; z_{b|a}]
        state = self.seed(embeddings)[owners]
        similarities = []
        for level in self.levels:
            asker = state.roll(pairs, dims=0) if self.query_mode == "other" else state  # z_{b|a} asks a, and back
            state = level.forward_pairs(state, asker, tokens, owners)
            normalized = F.normalize(state, dim=-1)
            similarities.append((normalized[:pairs] * normalized[pairs:]).sum(dim=-1))
        return tuple(similarities)


def build_head(config: object, token_dim: int, project_tokens: bool) -> CrossImageAttentionHead:
    """The head a config describes: a ``CrossMetricConfig`` (training) or a ``CrossMetricRerankerConfig`` (query time)
    name its architecture with the same ``cia_*`` fields; a re-ranker has no dropout."""
    return CrossImageAttentionHead(
        embedding_dim=config.embedding_dim,
        token_dim=token_dim,
        width=config.cia_dim,
        num_levels=config.cia_levels,
        num_heads=config.cia_heads,
        mlp_ratio=config.cia_mlp_ratio,
        dropout=getattr(config, "cia_dropout", 0.0),
        query=config.cia_query,
        project_tokens=project_tokens,
    )


def random_third_images(batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """B×B index k[i, j] of a uniformly random image other than i and j (other than j when B = 2), torch's RNG.

    The shuffled control's askers: each pair (i, j) is conditioned on a third image of the batch, never on its
    partner, and never on i itself while a third image exists (that would be the "self" control instead).
    """
    i = torch.arange(batch, device=device)[:, None].expand(batch, batch)
    j = torch.arange(batch, device=device)[None, :].expand(batch, batch)
    if batch < 3:
        return (1 - j) if batch == 2 else torch.zeros_like(i)
    low, high = torch.minimum(i, j), torch.maximum(i, j)
    k = torch.randint(0, batch - 2, (batch, batch), device=device)  # one of the B - 2 others, then skip i and j
    k = k + (k >= low).long()
    return k + (k >= high).long()


NEW_LAYER_FLAG = "_crossmetric_new_layer"


def mark_new_layers(module: nn.Module) -> None:
    """Flag the Linear and LayerNorm layers of ``module`` as ours (not timm's), for ``_init_weights``."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.LayerNorm)):
            setattr(layer, NEW_LAYER_FLAG, True)


def init_new_layer(layer: nn.Module) -> None:
    """Initialise one Linear (truncated normal, std 0.02, zero bias) or LayerNorm (identity) layer."""
    if isinstance(layer, nn.Linear):
        nn.init.trunc_normal_(layer.weight, std=0.02)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    elif isinstance(layer, nn.LayerNorm):
        nn.init.ones_(layer.weight)
        nn.init.zeros_(layer.bias)


def pair_cosine(state: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``S[i, j] = cos(z_{i|j}, z_{j|i})`` for a B×B×d tensor of pair states.

    The dot product divided by the two norms (B² scalars) rather than normalising the B²×d states first: the same
    value as ``F.normalize`` (norms clamped at ``eps``), at half the B²×d operations forward and backward.
    """
    norms = state.norm(dim=-1).clamp_min(eps)
    return (state * state.transpose(0, 1)).sum(dim=-1) / (norms * norms.transpose(0, 1))
