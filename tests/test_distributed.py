"""Real 2-process runs (accelerate launch, gloo on CPU): gathered loss equals one-process loss; checkpoints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _training_fixtures import TINY_RUN_ARGS, make_shapes_folder

HERE = Path(__file__).parent


def accelerate_launch(args: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
        *args,
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_gathered_base_loss_equals_the_single_process_loss() -> None:
    result = accelerate_launch([str(HERE / "_distributed_check.py")])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    # the two processes may print onto one line: take every {...} object
    rows = [json.loads(match) for match in re.findall(r"\{[^{}]*\}", result.stdout)]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for row in rows:
        assert row["gathered_mean"] == pytest.approx(row["expected"], abs=1e-5)
        assert row["grad_error"] < 1e-6


@pytest.mark.slow
def test_two_process_training_run_saves_a_checkpoint(tmp_path) -> None:
    shapes = make_shapes_folder(tmp_path / "shapes")
    args = [
        "-m",
        "crossmetric.cli",
        "train",
        *TINY_RUN_ARGS,
        "--dataset",
        str(shapes),
        "--output_dir",
        str(tmp_path / "out"),
        "--run_name",
        "run",
        "--max_steps",
        "2",
        "--save_steps",
        "1",
        "--export",
        "False",
        "--eval_every_epochs",
        "0",
        "--report_to",  # trackers finish inside train(); the process group must outlive them (the CLI ends it)
        "tensorboard",
    ]
    result = accelerate_launch(args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    checkpoints = sorted((tmp_path / "out" / "run" / "checkpoints").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["global_step"] == 2
    assert list((tmp_path / "out" / "run").rglob("events.out.tfevents.*"))


@pytest.mark.slow
@pytest.mark.parametrize("head_weights", [["--cia_loss_weight", "0"], ["--cia_level_weights", "1", "0"]])
def test_two_process_training_with_unreached_head_parameters(tmp_path, head_weights: list[str]) -> None:
    """λ = 0 (no head loss) or a zero last-level weight leaves head parameters that no loss reaches: DDP must not
    wait for their gradients (it would fail at the second step with an unused-parameter error)."""
    shapes = make_shapes_folder(tmp_path / "shapes")
    args = ["-m", "crossmetric.cli", "train", *TINY_RUN_ARGS, "--dataset", str(shapes)]
    args += ["--output_dir", str(tmp_path / "out"), "--run_name", "run", "--max_steps", "3", "--export", "False"]
    args += ["--eval_every_epochs", "0", "--zero_shot_eval", "False", *head_weights]
    result = accelerate_launch(args)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    log = [json.loads(line) for line in (tmp_path / "out" / "run" / "log.jsonl").read_text().splitlines()]
    steps = [record for record in log if "level_losses" in record]
    assert steps and all(len(record["level_losses"]) == 2 for record in steps)  # still reported, for logging
