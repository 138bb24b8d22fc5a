"""The head's token grid and its controls: an earlier backbone stage feeds the head (the export is unchanged),
and the ``shuffled`` control differs from CIA only in who asks: same parameters, same cost, other similarities."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

from crossmetric import CrossImageAttentionHead, CrossMetricConfig, CrossMetricForMetricLearning, CrossMetricModel

TINY = dict(embedding_dim=16, cia_dim=16, cia_heads=2, image_size=64)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backbone", ["test_resnet", "test_efficientnet", "tf_efficientnet_lite0"])
def test_head_sees_a_4x4_grid_at_64_px_and_its_gradient_reaches_that_stage(backbone: str) -> None:
    model = CrossMetricForMetricLearning(CrossMetricConfig(backbone=backbone, **TINY))
    output = model(torch.randn(6, 3, 64, 64), output_attentions=True)
    assert output.last_hidden_state.shape[1] == 4  # the embedder's own last map stays 2×2
    assert output.attentions[0].shape[-1] == 16  # the head attends over 4×4 tokens
    # the head alone (embeddings detached): its gradient reaches the stage directly, and nothing after it
    _, embeddings, head_tokens, _ = model.forward_head_inputs(torch.randn(6, 3, 64, 64))
    sum(s.sum() for s in model.head(embeddings.detach(), head_tokens).similarities).backward()
    stage = model.embedder.backbone.get_submodule(model.head_token_stage)
    assert sum(float(p.grad.abs().sum()) for p in stage.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in model.embedder.embedding.parameters())
    assert model.head.token_projection.weight.grad.abs().sum() > 0


def test_the_exported_embedder_is_unchanged_by_the_token_stage(tmp_path) -> None:
    torch.manual_seed(0)
    staged = CrossMetricForMetricLearning(CrossMetricConfig(backbone="test_resnet", **TINY))
    plain = CrossMetricModel(CrossMetricConfig(backbone="test_resnet", **TINY, cia_token_stride=0))
    plain.load_state_dict(staged.embedder.state_dict())
    staged.eval(), plain.eval()
    pixels = torch.randn(3, 3, 64, 64)
    tokens, embeddings, head_tokens, grid = staged.forward_head_inputs(pixels)
    expected = plain(pixels)
    torch.testing.assert_close(tokens, expected.last_hidden_state)
    torch.testing.assert_close(embeddings, expected.pooler_output)
    assert grid == (4, 4) and head_tokens.shape == (3, 16, 192)
    exported = load_file(staged.save_embedder(tmp_path / "export") / "model.safetensors")
    assert set(exported) == set(plain.state_dict())


def test_stride_0_keeps_the_last_map_without_projection() -> None:
    model = CrossMetricForMetricLearning(CrossMetricConfig(backbone="test_resnet", **TINY, cia_token_stride=0))
    assert model.head_token_stage is None and model.head.token_projection is None
    assert model(torch.randn(4, 3, 64, 64), output_attentions=True).attentions[0].shape[-1] == 4
    with pytest.raises(ValueError, match="finer than every stage"):
        CrossMetricForMetricLearning(CrossMetricConfig(backbone="test_resnet", **TINY, cia_token_stride=1))


def _flops(head: CrossImageAttentionHead, embeddings: torch.Tensor, tokens: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        output = head(embeddings, tokens, output_attentions=True)
        sum(s.sum() for s in output.similarities).backward()
    return counter.get_total_flops()


def test_shuffled_control_differs_from_cia_only_in_the_partner() -> None:
    torch.manual_seed(0)
    heads = {
        query: CrossImageAttentionHead(
            embedding_dim=12, token_dim=10, width=16, num_levels=2, num_heads=4, query=query, project_tokens=True
        )  # fmt: skip
        for query in ("other", "shuffled")
    }
    heads["other"].reset_parameters()
    for parameter in heads["other"].parameters():
        parameter.data.add_(0.1 * torch.randn_like(parameter))
    heads["shuffled"].load_state_dict(heads["other"].state_dict())  # strict: the same parameters, same shapes
    embeddings, tokens = torch.randn(8, 12), torch.randn(8, 16, 10)
    outputs = {query: head(embeddings, tokens, output_attentions=True) for query, head in heads.items()}
    for got, want in zip(outputs["shuffled"].attentions, outputs["other"].attentions):
        assert got.shape == want.shape  # the same B×B×heads×T attention at every level
    flops = {query: _flops(head, embeddings, tokens) for query, head in heads.items()}
    assert flops["shuffled"] == flops["other"] > 0
    for shuffled, cia in zip(outputs["shuffled"].similarities, outputs["other"].similarities):
        assert (shuffled - cia).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("loss_weight", "level_weights", "trained"), [(0.0, None, 0), (1.0, [1.0, 0.0], 1), (1.0, None, 2)]
)
def test_head_parameters_no_loss_reaches_are_frozen(loss_weight, level_weights, trained: int) -> None:
    from crossmetric.training.optimization import freeze_unreached_head_parameters

    model = CrossMetricForMetricLearning(CrossMetricConfig(backbone="test_resnet", **TINY))
    freeze_unreached_head_parameters(model, loss_weight, level_weights)
    levels = [all(p.requires_grad for p in level.parameters()) for level in model.head.levels]
    assert levels == [index < trained for index in range(2)]
    assert model.head.seed.weight.requires_grad == (trained > 0)
    assert all(p.requires_grad for p in model.embedder.parameters())
