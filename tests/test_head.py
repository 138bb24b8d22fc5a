"""The batched cross-image-attention head equals a naive per-pair loop, and its gradient reaches the feature map."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crossmetric import CrossImageAttentionHead
from crossmetric.modeling.cross_image_attention import random_third_images


def naive_pair_similarities(
    head: CrossImageAttentionHead, embeddings: torch.Tensor, tokens: torch.Tensor, partners: torch.Tensor | None = None
):
    """docs/design.md §1 written literally: one ordered pair (i, j) at a time, no batching tricks.

    In "shuffled" mode pair (i, j) is asked by z_{k|i}, k = partners[i, j], instead of z_{j|i}."""
    batch = embeddings.shape[0]
    seed = head.seed(embeddings)
    z = {(i, j): seed[i] for i in range(batch) for j in range(batch)}
    similarities, attentions = [], []
    for level in head.levels:
        new_z, weights = {}, torch.zeros(batch, batch, level.num_heads, tokens.shape[1])
        for i in range(batch):
            kv = level.key_value(level.token_norm(tokens[i]))
            keys, values = kv.split(kv.shape[-1] // 2, dim=-1)
            keys = keys.view(-1, level.num_heads, level.head_dim)
            values = values.view(-1, level.num_heads, level.head_dim)
            for j in range(batch):
                asker = {"other": z[(j, i)], "self": z[(i, j)]}.get(head.query_mode)
                if head.query_mode == "shuffled":
                    asker = z[(int(partners[i, j]), i)]
                query = level.query(level.query_norm(asker)).view(level.num_heads, level.head_dim)
                logits = torch.einsum("hc,thc->ht", query, keys) / level.head_dim**0.5
                attention = logits.softmax(-1)
                weights[i, j] = attention
                attended = level.out(torch.einsum("ht,thc->hc", attention, values).reshape(-1))
                state = z[(i, j)] + attended
                new_z[(i, j)] = state + level.mlp(level.mlp_norm(state))
        z = new_z
        sim = torch.ones(batch, batch)
        for i in range(batch):
            for j in range(batch):
                if i != j:
                    sim[i, j] = F.cosine_similarity(z[(i, j)], z[(j, i)], dim=0)
        similarities.append(sim)
        attentions.append(weights)
    return similarities, attentions


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("query", ["other", "self", "shuffled"])
@pytest.mark.parametrize("num_tokens", [7, 2])
def test_batched_head_equals_per_pair_loop(levels: int, query: str, num_tokens: int) -> None:
    """With 7 tokens the projections are applied per pair; with 2 they are folded into each image's keys/values."""
    head = CrossImageAttentionHead(
        embedding_dim=12, token_dim=10, width=16, num_levels=levels, num_heads=4, query=query
    )
    assert head.levels[0].folds_projections(num_tokens) == (num_tokens == 2)
    head.reset_parameters()
    for parameter in head.parameters():  # break the symmetric init so every term matters
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    head.eval()
    embeddings = F.normalize(torch.randn(5, 12), dim=-1)
    tokens = torch.randn(5, num_tokens, 10)
    partners = random_third_images(5)
    output = head(embeddings, tokens, output_attentions=True, partners=partners)
    expected_sims, expected_attn = naive_pair_similarities(head, embeddings, tokens, partners)
    assert len(output.similarities) == levels
    for got, want in zip(output.similarities, expected_sims):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(output.attentions, expected_attn):
        assert got.shape == (5, 5, 4, num_tokens)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_similarities_are_symmetric_with_unit_diagonal() -> None:
    head = CrossImageAttentionHead(embedding_dim=8, token_dim=6, width=8, num_levels=2, num_heads=2)
    head.reset_parameters()
    sims = head(torch.randn(4, 8), torch.randn(4, 3, 6)).similarities
    for s in sims:
        torch.testing.assert_close(s, s.T)
        torch.testing.assert_close(torch.diagonal(s), torch.ones(4))


def test_gradient_reaches_the_feature_map_through_attention() -> None:
    head = CrossImageAttentionHead(embedding_dim=8, token_dim=6, width=8, num_levels=2, num_heads=2)
    head.reset_parameters()
    tokens = torch.randn(4, 3, 6, requires_grad=True)
    embeddings = torch.randn(4, 8)  # no gradient path through the embeddings: only attention reaches tokens
    loss = sum(s.sum() for s in head(embeddings, tokens).similarities)
    loss.backward()
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0


def test_head_refuses_zero_levels_and_unknown_query() -> None:
    with pytest.raises(ValueError, match="num_levels"):
        CrossImageAttentionHead(embedding_dim=8, token_dim=6, num_levels=0)
    with pytest.raises(ValueError, match="query"):
        CrossImageAttentionHead(embedding_dim=8, token_dim=6, query="both")


@pytest.mark.parametrize("project_tokens", [True, False])
@pytest.mark.parametrize("query", ["other", "self"])
def test_pair_similarities_equal_the_batched_entries(query: str, project_tokens: bool) -> None:
    """Re-ranking's pair-list path (key and value projections folded into the pairs) gives the batched head's
    S^l[a, b], with and without the token projection."""
    head = CrossImageAttentionHead(embedding_dim=8, token_dim=6, width=8, num_levels=2, num_heads=2, query=query,
                                   project_tokens=project_tokens)  # fmt: skip
    head.reset_parameters()
    for parameter in head.parameters():
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    embeddings, tokens = torch.randn(5, 8), torch.randn(5, 9, 6)
    batched = head(embeddings, tokens).similarities
    first, second = torch.tensor([0, 0, 3, 4, 2]), torch.tensor([1, 4, 2, 0, 2])
    for got, want in zip(head.pair_similarities(embeddings, tokens, first, second), batched):
        torch.testing.assert_close(got, want[first, second], atol=1e-5, rtol=1e-5)


def test_random_third_images_avoid_both_images_of_the_pair() -> None:
    torch.manual_seed(0)
    for batch in (3, 4, 9):
        draws = torch.stack([random_third_images(batch) for _ in range(200)])
        i = torch.arange(batch)[:, None]
        j = torch.arange(batch)[None, :]
        assert ((draws != i) & (draws != j)).all() and draws.max() < batch
        seen = {int(k) for k in draws[:, 0, 1]}
        assert seen == set(range(2, batch))  # every third image of pair (0, 1) is drawn
    assert random_third_images(2).tolist() == [[1, 0], [1, 0]]  # two images: never the partner
