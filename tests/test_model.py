"""The embedder and its training wrapper: outputs, config validation, CNN and ViT backbones."""

from __future__ import annotations

import pytest
import torch

from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning, CrossMetricModel


def test_public_classes_import_from_the_package_root() -> None:
    import crossmetric

    for name in ("CrossMetricConfig", "CrossMetricModel", "CrossMetricForMetricLearning", "CrossImageAttentionHead"):
        assert hasattr(crossmetric, name)


def test_tiny_backbone_defaults_work_without_other_arguments() -> None:
    config = CrossMetricConfig(backbone="test_resnet", embedding_dim=32)
    assert config.model_type == "crossmetric"
    model = CrossMetricModel(config).eval()
    output = model(torch.randn(2, 3, 64, 64))
    assert output.pooler_output.shape == (2, 32)
    torch.testing.assert_close(output.pooler_output.norm(dim=-1), torch.ones(2))
    batch, tokens, channels = output.last_hidden_state.shape
    assert (batch, channels) == (2, model.token_dim) and tokens == 4  # 64 px / stride 32 = 2×2 tokens


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_vit_tokens_drop_prefix_tokens(pooling: str) -> None:
    config = CrossMetricConfig(backbone="test_vit", embedding_dim=16, pooling=pooling)
    model = CrossMetricModel(config).eval()
    output = model(torch.randn(2, 3, 160, 160))
    assert output.last_hidden_state.shape == (2, 100, 64)  # 10×10 patches; the CLS token is not a patch token
    assert output.pooler_output.shape == (2, 16)


@pytest.mark.parametrize("pooling", ["avg", "gem", "max+avg"])
def test_cnn_poolings(pooling: str) -> None:
    model = CrossMetricModel(CrossMetricConfig(backbone="test_resnet", embedding_dim=8, pooling=pooling)).eval()
    assert model(torch.randn(2, 3, 64, 64)).pooler_output.shape == (2, 8)


def test_cls_pooling_on_a_cnn_is_refused_with_the_field_name() -> None:
    model = CrossMetricModel(CrossMetricConfig(backbone="test_resnet", embedding_dim=8, pooling="cls"))
    with pytest.raises(ValueError, match="pooling='cls'"):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("embedding_dim", 0),
        ("cia_dim", -4),
        ("cia_levels", -1),
        ("cia_heads", 0),
        ("pooling", "median"),
        ("cia_query", "both"),
        ("image_size", "large"),
        ("crop_pct", 1.5),
        ("cia_dropout", 1.0),
        ("cia_level_weights", [1.0]),
    ],
)
def test_bad_config_values_raise_value_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"CrossMetricConfig\.{field}="):
        CrossMetricConfig(**{"backbone": "test_resnet", "embedding_dim": 32, field: value})


def test_head_width_not_divisible_by_heads_is_refused() -> None:
    with pytest.raises(ValueError, match=r"cia_dim=30 .*divisible by cia_heads=4"):
        CrossMetricConfig(backbone="test_resnet", cia_dim=30, cia_heads=4)


def test_unknown_backbone_is_refused_before_building() -> None:
    with pytest.raises(ValueError, match="not a timm model"):
        CrossMetricModel(CrossMetricConfig(backbone="resnet_does_not_exist"))


def test_metric_learning_forward_gives_embeddings_similarities_and_loss() -> None:
    config = CrossMetricConfig(backbone="test_resnet", embedding_dim=16, cia_levels=2, cia_dim=16, cia_heads=2)
    model = CrossMetricForMetricLearning(config)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    output = model(torch.randn(6, 3, 64, 64), labels=labels, output_attentions=True)
    assert output.embeddings.shape == (6, 16)
    assert [s.shape for s in output.conditional_similarities] == [(6, 6), (6, 6)]
    assert output.attentions[0].shape == (6, 6, 2, 16)  # test_resnet's stride-16 stage: 4×4 at 64 px
    output.loss.backward()
    assert model.head.levels[0].key_value.weight.grad is not None
    first_backbone_weight = next(model.embedder.backbone.parameters())
    assert first_backbone_weight.grad.abs().sum() > 0


def test_head_off_is_the_same_model_without_head_parameters() -> None:
    model = CrossMetricForMetricLearning(CrossMetricConfig(backbone="test_resnet", embedding_dim=16, cia_levels=0))
    assert model.head is None
    output = model(torch.randn(4, 3, 64, 64), labels=torch.tensor([0, 0, 1, 1]))
    assert output.conditional_similarities == () and output.loss is not None


def test_training_checkpoint_round_trip_keeps_the_head(tmp_path) -> None:
    config = CrossMetricConfig(backbone="test_resnet", embedding_dim=16, cia_dim=16, cia_heads=2)
    model = CrossMetricForMetricLearning(config).eval()
    model.save_pretrained(tmp_path)
    reloaded, info = CrossMetricForMetricLearning.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reloaded.eval()
    x = torch.randn(4, 3, 64, 64)
    a, b = model(x), reloaded(x)
    torch.testing.assert_close(a.embeddings, b.embeddings)
    for s, t in zip(a.conditional_similarities, b.conditional_similarities):
        torch.testing.assert_close(s, t)


def test_from_pretrained_initialises_non_persistent_buffers_and_new_layers(tmp_path) -> None:
    """Weights not in the file (the head, when loading an export) must not be uninitialised memory."""
    config = CrossMetricConfig(backbone="test_resnet", embedding_dim=16, cia_dim=16, cia_heads=2)
    CrossMetricForMetricLearning(config).save_embedder(tmp_path / "export")
    model = CrossMetricForMetricLearning.from_pretrained(tmp_path / "export")
    for name, parameter in model.head.named_parameters():
        assert torch.isfinite(parameter).all(), name
        assert parameter.abs().max() < 10, name
