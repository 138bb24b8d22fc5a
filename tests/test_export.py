"""Export writes the embedder alone; three reload paths and the stock pipeline give the same embeddings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _remote_code import embed_with_remote_code
from PIL import Image
from safetensors import safe_open
from transformers import AutoImageProcessor, AutoModel, pipeline

from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning, CrossMetricModel


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[CrossMetricForMetricLearning, Path]:
    torch.manual_seed(0)
    config = CrossMetricConfig(backbone="test_resnet", embedding_dim=32, image_size=64, cia_dim=16, cia_heads=2)
    model = CrossMetricForMetricLearning(config).eval()
    directory = tmp_path_factory.mktemp("export") / "model"
    model.save_embedder(directory)
    return model, directory


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (80 + 7 * i, 70, 3), dtype=np.uint8)) for i in range(3)]


def reference_embeddings(model: CrossMetricForMetricLearning, directory: Path, images) -> torch.Tensor:
    pixel_values = AutoImageProcessor.from_pretrained(directory)(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model.embedder(pixel_values).pooler_output


def test_export_has_no_head_keys_and_names_the_embedder(exported) -> None:
    model, directory = exported
    with safe_open(directory / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert keys and not [k for k in keys if k.startswith("head.")]
    assert set(keys) == set(model.embedder.state_dict())
    config = json.loads((directory / "config.json").read_text())
    assert config["architectures"] == ["CrossMetricModel"]
    assert config["model_type"] == "crossmetric"
    assert "auto_map" in config
    processor = json.loads((directory / "preprocessor_config.json").read_text())
    assert "auto_map" not in processor  # a stock processor: no trust question in the stock pipeline
    assert not list(directory.parent.glob(".model.partial-*"))


def test_reload_with_the_class_and_automodel_gives_identical_embeddings(exported, images) -> None:
    model, directory = exported
    expected = reference_embeddings(model, directory, images)
    pixel_values = AutoImageProcessor.from_pretrained(directory)(images, return_tensors="pt")["pixel_values"]
    for loader in (CrossMetricModel.from_pretrained, AutoModel.from_pretrained):
        reloaded, info = loader(directory, output_loading_info=True)
        assert isinstance(reloaded, CrossMetricModel)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        with torch.no_grad():
            got = reloaded.eval()(pixel_values).pooler_output
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_trust_remote_code_reload_works_where_crossmetric_cannot_be_imported(exported, images, tmp_path) -> None:
    model, directory = exported
    expected = reference_embeddings(model, directory, images)
    pixel_values = AutoImageProcessor.from_pretrained(directory)(images, return_tensors="pt")["pixel_values"]
    got = embed_with_remote_code(directory, pixel_values, tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_stock_image_feature_extraction_pipeline_gives_the_model_embeddings(exported, images) -> None:
    model, directory = exported
    expected = reference_embeddings(model, directory, images)
    extractor = pipeline("image-feature-extraction", model=str(directory), pool=True)
    got = torch.tensor(np.array(extractor(images)), dtype=torch.float32).reshape(len(images), -1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_a_new_export_replaces_the_old_one_whole(exported, tmp_path) -> None:
    model, _ = exported
    directory = tmp_path / "model"
    model.save_embedder(directory)
    (directory / "stale.txt").write_text("from an older export")
    model.save_embedder(directory)
    assert not (directory / "stale.txt").exists()
    assert (directory / "model.safetensors").exists()


def test_pickle_weights_are_refused_unless_explicitly_allowed(exported, tmp_path) -> None:
    model, directory = exported
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((directory / "config.json").read_text())
    torch.save(model.embedder.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(OSError, match="only safetensors"):
        CrossMetricModel.from_pretrained(pickled)
    loaded = CrossMetricModel.from_pretrained(pickled, use_safetensors=False)
    assert isinstance(loaded, CrossMetricModel)
