"""A training-free re-ranking control: DIML's structural similarity on the same tokens the learned head reads.

DIML (Zhao et al., ICCV 2021, "Towards Interpretable Deep Metric Learning with Structural Matching") re-scores a
pair from local features with no parameters of its own: each token of image a is weighted by how much it agrees
with image b as a whole, ``w_a,t = relu(g_b · a_t)``, and the pair's score compares the weighted token sums,
``cos(Σ_t w_a,t a_t, Σ_t w_b,t b_t)`` (its optimal-transport form is left out). Evaluated next to the learned head
on the same candidates and tokens, it says what the head adds over the tokens themselves.

Our choice where the tokens and the embedding differ in width (the head reads an earlier stage: 112 channels on the
main job's lite0 at stride 16, against a 128-d embedding, so ``e_b · a_t`` is not defined): the global descriptor
``g_b`` is b's mean-pooled tokens, in the tokens' own space, which is what the embedding is a linear map of under
average pooling; the agreement is a cosine (``relu(cos(g_b, a_t))``), so that neither image's token norms sets the
weights. Where the widths match, ``g_b`` is b's embedding, as in DIML.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _weighted_sum(tokens: torch.Tensor, descriptor: torch.Tensor) -> torch.Tensor:
    """``Σ_t relu(cos(descriptor, token_t)) · token_t`` of P token sets (P×T×C) against P descriptors (P×C)."""
    weights = torch.relu(torch.einsum("ptc,pc->pt", F.normalize(tokens, dim=-1), F.normalize(descriptor, dim=-1)))
    return torch.einsum("pt,ptc->pc", weights, tokens)


@torch.no_grad()
def structural_similarity(
    first_embeddings: torch.Tensor,
    first_tokens: torch.Tensor,
    second_embeddings: torch.Tensor,
    second_tokens: torch.Tensor,
) -> torch.Tensor:
    """The training-free score of P pairs: embeddings P×D, tokens P×T×C (float32), P scores in [-1, 1]."""
    if first_tokens.shape[-1] == first_embeddings.shape[-1]:
        first_global, second_global = first_embeddings, second_embeddings
    else:
        first_global, second_global = first_tokens.mean(dim=1), second_tokens.mean(dim=1)
    first_sum = _weighted_sum(first_tokens, second_global)
    second_sum = _weighted_sum(second_tokens, first_global)
    return (F.normalize(first_sum, dim=-1) * F.normalize(second_sum, dim=-1)).sum(dim=-1)


def structural_scores(
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    query_ids: np.ndarray,
    neighbours: np.ndarray,
    queries_per_chunk: int = 128,
) -> np.ndarray:
    """Q×K training-free scores of each query (``query_ids``: rows) and its candidates (``neighbours``: Q×K rows)."""
    scores = np.empty(neighbours.shape, dtype=np.float32)
    for start in range(0, len(query_ids), queries_per_chunk):
        chunk = neighbours[start : start + queries_per_chunk]
        first = torch.from_numpy(np.repeat(query_ids[start : start + queries_per_chunk], chunk.shape[1]))
        second = torch.from_numpy(chunk.ravel())
        pair = structural_similarity(
            embeddings[first].float(), tokens[first].float(), embeddings[second].float(), tokens[second].float()
        )
        scores[start : start + len(chunk)] = pair.view(chunk.shape).numpy()
    return scores
