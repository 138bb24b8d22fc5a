"""Model selection on a validation split carved from the training classes; the test split is read once, at the end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_fixtures import make_shapes_folder

from crossmetric.evaluation import evaluator as evaluator_module
from crossmetric.modeling.modeling_crossmetric import CrossMetricModel
from crossmetric.training.config import TrainingConfig
from crossmetric.training.recipes import fit_recipe
from crossmetric.training.trainer import CrossMetricTrainer


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    # 24 classes: 12 train classes, of which round(0.2 * 12) = 2 become the validation split
    return make_shapes_folder(tmp_path_factory.mktemp("data") / "shapes", num_classes=24, per_class=6)


def tiny(shapes: Path, output_dir: Path, **overrides) -> TrainingConfig:
    values = dict(
        dataset=str(shapes), output_dir=str(output_dir), run_name="run", backbone="test_resnet", pretrained="none",
        image_size=32, embedding_dim=16, cia_dim=16, cia_heads=2, batch_size=8, samples_per_class=2,
        eval_batch_size=64, warmup_steps=0, progress=False, split_strategy="sorted", num_epochs=2,
        eval_every_epochs=1, steps_per_epoch=0,
    )  # fmt: skip
    return TrainingConfig(**{**values, **overrides})


def labels_of(split) -> set[int]:
    return set(np.unique(split.with_format("numpy")["label"]).tolist())


def test_validation_split_is_carved_from_train_classes_and_disjoint_from_train_and_test(shapes, tmp_path) -> None:
    trainer = CrossMetricTrainer(tiny(shapes, tmp_path))
    train, validation, test = (labels_of(trainer.dataset[s]) for s in ("train", "validation", "test"))
    assert len(validation) == 2 and len(train) == 10 and len(test) == 12
    assert not (train & validation) and not (train & test) and not (validation & test)
    assert trainer.selection_split == "validation"


def test_the_test_split_is_never_read_during_selection(shapes, tmp_path, monkeypatch) -> None:
    embedded: list[str] = []
    original = evaluator_module.embed_split

    def recording(embedder, split, **kwargs):
        embedded.append(split._fingerprint)
        return original(embedder, split, **kwargs)

    monkeypatch.setattr(evaluator_module, "embed_split", recording)
    trainer = CrossMetricTrainer(tiny(shapes, tmp_path, zero_shot_eval=False))
    result = trainer.train()
    test, validation = trainer.dataset["test"]._fingerprint, trainer.dataset["validation"]._fingerprint
    assert embedded[-1] == test and embedded.count(test) == 1  # once, for the selected model, after every candidate
    assert set(embedded[:-1]) == {validation} and len(embedded[:-1]) == len(result.validation_curve) == 3
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "eval" in r] == [r["step"] for r in result.validation_curve]
    best = max(result.validation_curve, key=lambda r: (r["recall@1"], r["map@r"]))
    assert result.best_metrics["step"] == best["step"]  # the exported model is the best candidate on validation


def test_the_starting_model_is_kept_when_training_only_hurts(shapes, tmp_path) -> None:
    # absurd rates, and half the train classes for validation (2 classes saturate at Recall@1 = 1)
    rates = {"learning_rate": 1e3, "backbone_learning_rate": 1e3, "head_learning_rate": 1e3, "max_grad_norm": None}
    trainer = CrossMetricTrainer(tiny(shapes, tmp_path, validation_fraction=0.5, **rates))
    start = {k: v.clone() for k, v in trainer.model.embedder.state_dict().items()}
    result = trainer.train()
    curve = {r["step"]: r["recall@1"] for r in result.validation_curve}
    assert max(v for s, v in curve.items() if s > 0) < curve[0]  # every trained candidate is worse on validation
    assert result.best_metrics["step"] == 0
    export = result.export()
    exported = CrossMetricModel.from_pretrained(export).state_dict()
    assert all(torch.equal(exported[k], start[k]) for k in start)  # the exported model is the starting model
    assert result.metrics == pytest.approx(result.zero_shot)  # and its test metrics are the zero-shot ones
    # `crossmetric export --checkpoint RUN` exports the selected model too; a checkpoint folder exports its own step
    from crossmetric.cli.main import main

    run, latest = tmp_path / "run", sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))[-1]
    assert main(["export", "--checkpoint", str(run), "--output_dir", str(tmp_path / "from_run")]) == 0
    assert main(["export", "--checkpoint", str(latest), "--output_dir", str(tmp_path / "from_latest")]) == 0
    from_run = CrossMetricModel.from_pretrained(tmp_path / "from_run").state_dict()
    from_latest = CrossMetricModel.from_pretrained(tmp_path / "from_latest").state_dict()
    assert all(torch.equal(from_run[k], start[k]) for k in start)
    assert not all(torch.equal(from_latest[k], start[k]) for k in start)
    assert json.loads((tmp_path / "from_run" / "metrics.json").read_text())["step"] == 0


def test_recipe_sizes_p_k_from_small_data_and_keeps_explicit_values() -> None:
    few_classes = TrainingConfig(dataset="folder", pretrained="none")
    notes = fit_recipe(few_classes, np.repeat(np.arange(3), 3))  # 3 classes with 3 images each
    assert (few_classes.samples_per_class, few_classes.batch_size) == (3, 9)
    assert any("only 3 training classes" in n for n in notes) and any("K=3" in n for n in notes)
    assert few_classes.freeze_batchnorm is False and few_classes.embedding_init == "random"
    explicit = TrainingConfig(dataset="folder", batch_size=32, samples_per_class=2, learning_rate=5e-4)
    fit_recipe(explicit, np.repeat(np.arange(200), 6))
    assert (explicit.batch_size, explicit.samples_per_class, explicit.learning_rate) == (32, 2, 5e-4)
    assert explicit.freeze_batchnorm is True and explicit.embedding_init == "pca"  # pretrained weights by default
    assert explicit.backbone_learning_rate < explicit.learning_rate  # new layers faster than the backbone


def test_a_folder_with_6_classes_of_3_images_trains_with_a_smaller_p_and_k(tmp_path, caplog) -> None:
    folder = make_shapes_folder(tmp_path / "small", num_classes=6, per_class=3)
    config = TrainingConfig(
        dataset=str(folder), output_dir=str(tmp_path / "out"), run_name="run", backbone="test_resnet",
        pretrained="none", image_size=32, embedding_dim=16, cia_dim=16, cia_heads=2, progress=False,
        split_strategy="sorted", max_steps=3, eval_batch_size=32,
    )  # fmt: skip
    with caplog.at_level("INFO"):
        result = CrossMetricTrainer(config).train()
    assert result.global_step == 3 and (config.samples_per_class, config.batch_size) == (3, 9)
    assert "only 3 training classes, so P=3" in caplog.text and "K=3" in caplog.text
    assert result.selection_split is None  # 3 train classes: too few for a validation split, said in the log
    assert "no validation split" in caplog.text
