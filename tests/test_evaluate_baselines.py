"""``crossmetric evaluate``'s trivial baselines (raw pixels, zero-shot backbone) and its use of the one ``Evaluator``.

Checks that the baseline rows hold exactly the metrics of :class:`Evaluator` on the same split (printed, in
``baselines.json``, in ``report.md`` and as curves), that ``metrics.json`` keeps only the model's metrics, that a
zero-shot row that cannot be computed is skipped with a one-line reason instead of failing, and that a folder with
unreadable images (which ``train`` accepts) evaluates.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _training_fixtures import TINY_MODEL, make_shapes_folder, one_thread_fixture

from crossmetric.cli.main import main
from crossmetric.data.dml_dataset import label_array, load_dml_dataset
from crossmetric.evaluation.evaluator import Evaluator, raw_pixel_features
from crossmetric.inference.pretrained import WEIGHT_SOURCES, load_pretrained_backbone
from crossmetric.modeling.configuration_crossmetric import CrossMetricConfig
from crossmetric.modeling.modeling_crossmetric import CrossMetricForMetricLearning, CrossMetricModel
from crossmetric.training.config import TrainingConfig
from crossmetric.training.embedding_init import pooled_features

TINY = {**TINY_MODEL, "image_size": 32}
MODEL_KEYS = {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi"}
LITE0 = "pypi:efficientnet-lite0"


_one_thread = pytest.fixture(scope="module", autouse=True, name="_one_thread")(one_thread_fixture)  # tiny models


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """6 classes × 4 images, plus an empty and a truncated file in test classes (the sorted split's classes 3-5)."""
    root = make_shapes_folder(tmp_path_factory.mktemp("data") / "shapes", num_classes=6, per_class=4)
    (root / "class_04" / "empty.png").write_bytes(b"")
    whole = (root / "class_05" / "0.png").read_bytes()
    (root / "class_05" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    return root


def _export(root: Path, config: CrossMetricConfig, pretrained: str | None) -> Path:
    """An exported model folder; with ``pretrained``, the ``training_config.yaml`` an export of a run has."""
    folder = CrossMetricForMetricLearning(config).save_embedder(root)
    if pretrained is not None:
        training = TrainingConfig(pretrained=pretrained, **TINY)
        (folder / "training_config.yaml").write_text(yaml.safe_dump(training.to_dict()))
    return folder


def _evaluate(*args: str) -> int:
    return main(["evaluate", "--no-progress", "--split_strategy", "sorted", *args])


def _test_evaluator(shapes: Path) -> Evaluator:
    return Evaluator.from_dataset(load_dml_dataset(str(shapes), split_strategy="sorted"), "test")


def test_raw_pixel_row_and_skipped_zero_shot_on_a_folder_with_unreadable_images(shapes, tmp_path, capsys) -> None:
    model = _export(tmp_path / "model", CrossMetricConfig(**TINY), pretrained="none")
    out = tmp_path / "eval"
    assert _evaluate("--model", str(model), "--dataset", str(shapes), "--output_dir", str(out)) == 0
    printed = capsys.readouterr().out
    evaluator = _test_evaluator(shapes)
    assert len(evaluator.queries) == 12  # the two unreadable files were dropped when the dataset was loaded
    expected = evaluator.evaluate_features(raw_pixel_features)
    baselines = json.loads((out / "baselines.json").read_text())
    assert baselines["raw pixels"] == pytest.approx(expected, rel=1e-6)
    assert "zero-shot" not in baselines and "pretrained='none'" in baselines["skipped"]["zero-shot"]
    assert set(json.loads((out / "metrics.json").read_text())) == MODEL_KEYS  # the model's keys only
    header = printed.splitlines()[0].split()
    assert header == ["metric", "model", "raw", "pixels"]
    assert f"{expected['recall@1']:.4f}" in next(line for line in printed.splitlines() if line.startswith("recall@1"))
    assert "zero-shot: skipped (trained with pretrained='none'" in printed
    report = (out / "report" / "report.md").read_text()
    assert "raw pixels" in report and "skipped: trained with pretrained='none'" in report
    assert f"{expected['map@r']:.4f}" in report
    curves = json.loads((out / "report" / "recall_at_k.json").read_text())
    assert set(curves) == {"k", "model", "raw pixels"}
    assert curves["raw pixels"][0] == pytest.approx(expected["recall@1"])


def test_no_training_config_and_no_baselines(shapes, tmp_path, capsys) -> None:
    """A folder without training_config.yaml: the zero-shot row is skipped with why; ``--baselines`` alone: none."""
    model = _export(tmp_path / "model", CrossMetricConfig(**TINY), pretrained=None)
    out = tmp_path / "eval"
    assert _evaluate("--model", str(model), "--dataset", str(shapes), "--output_dir", str(out)) == 0
    assert "no training_config.yaml" in json.loads((out / "baselines.json").read_text())["skipped"]["zero-shot"]
    out = tmp_path / "none"
    args = ("--model", str(model), "--dataset", str(shapes), "--output_dir", str(out), "--baselines")
    assert _evaluate(*args) == 0
    assert json.loads((out / "baselines.json").read_text()) == {"skipped": {}}
    assert set(json.loads((out / "report" / "recall_at_k.json").read_text())) == {"k", "model"}
    assert capsys.readouterr().out.splitlines()[-1 - 8].split() == ["metric", "model"]


def test_zero_shot_row_is_the_pretrained_backbones_pooled_features(shapes, tmp_path, capsys) -> None:
    """lite0 at 32 px: the row equals the metrics of the ImageNet backbone's pooled, L2-normalised features."""
    config = CrossMetricConfig(**{**TINY, "backbone": "tf_efficientnet_lite0"}, **WEIGHT_SOURCES[LITE0].normalisation)
    model = _export(tmp_path / "model", config, pretrained=LITE0)
    out = tmp_path / "eval"
    args = ("--model", str(model), "--dataset", str(shapes), "--output_dir", str(out), "--baselines", "zero_shot")
    assert _evaluate(*args) == 0
    evaluator = _test_evaluator(shapes)
    backbone = CrossMetricModel(config)
    load_pretrained_backbone(backbone, LITE0)
    split = evaluator.queries
    pooled = pooled_features(
        backbone, split, max_images=len(split), batch_size=256, seed=0, device=torch.device("cpu"), progress=False
    )
    labels = label_array(split)
    expected = evaluator.metrics([(torch.nn.functional.normalize(pooled, dim=-1).numpy(), labels)])
    baselines = json.loads((out / "baselines.json").read_text())
    assert set(baselines) == {"zero-shot", "skipped"} and baselines["skipped"] == {}
    assert baselines["zero-shot"] == pytest.approx(expected, rel=1e-5)
    assert capsys.readouterr().out.splitlines()[0].split() == ["metric", "model", "zero-shot"]
