"""Resolving a model argument (``--model`` of every command, ``model=`` of the Python API) in one place:
an exported folder, a training run folder, a checkpoint, a Hub id, and the messages for values that name nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from crossmetric.inference.loading import is_hub_id, load_embedder, resolve_model
from crossmetric.inference.run_folder import COMPLETE_MARKER
from crossmetric.modeling.configuration_crossmetric import CrossMetricConfig
from crossmetric.modeling.modeling_crossmetric import CrossMetricForMetricLearning, CrossMetricModel, save_embedder


def _tiny_model() -> CrossMetricForMetricLearning:
    config = CrossMetricConfig(backbone="test_resnet", image_size=32, embedding_dim=8, cia_dim=8, cia_heads=2)
    return CrossMetricForMetricLearning(config).eval()


def test_exported_folder_and_run_folder_resolve_to_the_export(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_embedder(_tiny_model().embedder, run / "model")
    assert resolve_model(str(run / "model")) == ("export", run / "model")
    assert resolve_model(run) == ("export", run / "model")  # a run folder: its model/ export
    embedder, processor = load_embedder(str(run))
    assert isinstance(embedder, CrossMetricModel) and not embedder.training
    assert processor.size is not None


def test_checkpoint_and_run_without_export_resolve_to_the_checkpoint(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    assert resolve_model(checkpoint) == ("checkpoint", checkpoint)
    (checkpoint / COMPLETE_MARKER).write_text("")  # a complete checkpoint makes its parent folder a run
    assert resolve_model(tmp_path / "run") == ("checkpoint", tmp_path / "run")


def test_hub_ids_use_the_hub_rule() -> None:
    assert resolve_model("user/crossmetric-cub200") == ("hub", "user/crossmetric-cub200")
    assert is_hub_id("user/name.v2") and not is_hub_id("no-namespace") and not is_hub_id("a/b/c")
    assert not is_hub_id("user/bad--name")  # validate_repo_id refuses '--'


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("missing-folder", "no such folder, and not a Hub id of the form user/name"),
        ("./a/b/c", "no such folder"),
        ("user/bad--name", "no such folder"),
    ],
)
def test_values_that_name_nothing_are_refused_with_the_flag(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        resolve_model(value, "--baseline_model")
    assert f"--baseline_model {value!r}" in str(error.value) and "pass an exported model folder" in str(error.value)


def test_empty_folder_and_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no config.json, no model/ export and no checkpoints/"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model(tmp_path / "weights.bin")


def test_model_objects_give_their_embedder_and_evaluation_preprocessing() -> None:
    model = _tiny_model()
    embedder, processor = load_embedder(model)
    assert embedder is model.embedder and processor is not None
    with pytest.raises(TypeError, match="model must be"):
        load_embedder(3)  # type: ignore[arg-type]
