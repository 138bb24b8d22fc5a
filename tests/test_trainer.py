"""Training end to end on a tiny image folder: logs, checkpoints, evaluation, export (exact resume after SIGKILL:
test_faults.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _training_fixtures import make_shapes_folder
from _training_fixtures import tiny_config as tiny_run_config
from safetensors import safe_open

from crossmetric.training.config import TrainingConfig
from crossmetric.training.trainer import CrossMetricTrainer


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_folder(tmp_path_factory.mktemp("data") / "shapes")


def tiny_config(shapes: Path, output_dir: Path, **overrides) -> TrainingConfig:
    """Two epochs of the tiny run (_training_fixtures.TINY_RUN) on ``shapes``."""
    return tiny_run_config(**{"dataset": str(shapes), "output_dir": str(output_dir), "num_epochs": 2, **overrides})


def test_train_logs_checkpoints_evaluates_and_exports(shapes, tmp_path) -> None:
    trainer = CrossMetricTrainer(tiny_config(shapes, tmp_path))
    result = trainer.train()
    run = tmp_path / "run"
    assert result.global_step == 2 * len(trainer.sampler)
    assert {"recall@1", "recall@8", "map@r", "r_precision", "nmi"} <= set(result.metrics)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    losses = [r for r in log if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, result.global_step + 1))
    assert all(len(r["level_losses"]) == 2 for r in losses)
    assert [r["step"] for r in log if "zero_shot" in r] == [0]
    assert [r["step"] for r in log if "final" in r] == [result.global_step]
    assert trainer.checkpoints and (trainer.checkpoints[-1] / "COMPLETE").exists()
    assert result.export_directory is None and not (run / "model").exists()  # train() never exports: the caller does
    export = result.export()
    assert export == result.export_directory == run / "model"
    with safe_open(export / "model.safetensors", "pt") as weights:
        assert not [k for k in weights.keys() if k.startswith("head.")]
    assert json.loads((export / "metrics.json").read_text())["recall@1"] == pytest.approx(result.metrics["recall@1"])
    card = (export / "README.md").read_text()
    assert "pipeline_tag: image-feature-extraction" in card and "test_resnet" in card
    assert not (run / "best").exists()  # 4 train classes: no validation split to select on, the last model is kept
    assert (run / "training_config.yaml").exists()


def test_head_off_is_the_baseline_on_the_same_code_path(shapes, tmp_path) -> None:
    result = CrossMetricTrainer(tiny_config(shapes, tmp_path, cia_levels=0, num_epochs=1, export=False)).train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(r["level_losses"] == [] and r["loss"] == r["base_loss"] for r in log if "loss" in r)
    assert result.export_directory is None


def test_compiled_head_trains_like_the_eager_head_with_the_same_checkpoint_keys(shapes, tmp_path) -> None:
    """``compile_head`` (torch.compile, in place) changes speed, not the run: same losses, same weights' names."""
    logs, keys = [], []
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        trainer = CrossMetricTrainer(tiny_config(shapes, out, num_epochs=1, export=False, compile_head=compiled))
        trainer.train()
        assert (trainer.model.head._compiled_call_impl is not None) == compiled  # nn.Module.compile's wrapper
        log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
        logs.append([r["level_losses"] for r in log if "loss" in r])
        with safe_open(trainer.checkpoints[-1] / "model.safetensors", "pt") as weights:
            keys.append(sorted(weights.keys()))
    assert keys[0] == keys[1] and any(k.startswith("head.levels.0.") for k in keys[1])
    assert len(logs[0]) == len(logs[1]) > 1
    for eager, compiled in zip(logs[0], logs[1]):
        assert compiled == pytest.approx(eager, rel=1e-3, abs=1e-4)


def test_bad_configuration_is_refused_before_any_work(shapes, tmp_path) -> None:
    with pytest.raises(ValueError, match="batch_size=10 is not P x K"):
        CrossMetricTrainer(tiny_config(shapes, tmp_path, batch_size=10, samples_per_class=4))
    with pytest.raises(ValueError, match="learning_rate"):
        CrossMetricTrainer(tiny_config(shapes, tmp_path, learning_rate=0.0))
    assert not (tmp_path / "run").exists()


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "crossmetric.cli", "train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _run(args: list[str]) -> str:
    process = _cli(args)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output
