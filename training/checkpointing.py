"""Checkpoint folders that are either complete or ignored.

A checkpoint is written into a hidden temporary folder, completed with a ``COMPLETE`` marker, then renamed into
place; ``latest`` is resolved by scanning for complete folders, so a run killed during a write (or a full disk)
never leaves a half-written checkpoint that a resume would take for a good one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

COMPLETE_MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_root(run_directory: Path) -> Path:
    return run_directory / "checkpoints"


def complete_checkpoints(run_directory: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_directory)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file() and (child / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(run_directory: Path, requested: str) -> Path:
    """``requested`` is a checkpoint path or ``"latest"``; refuse incomplete or missing ones with the reason."""
    if requested == "latest":
        checkpoints = complete_checkpoints(run_directory)
        if not checkpoints:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no complete checkpoint under {checkpoint_root(run_directory)}. "
                "Start without --resume_from_checkpoint, or give the run's --output_dir/--run_name."
            )
        return checkpoints[-1]
    path = Path(requested)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {requested}: no such folder.")
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {requested} is incomplete (written when the run was interrupted); "
            "use 'latest' to pick the last complete one."
        )
    return path


def write_checkpoint(
    run_directory: Path, step: int, write_contents: Callable[[Path], None], state: dict[str, Any], keep: int
) -> Path:
    """Write checkpoint ``step`` atomically: contents and state into a temporary folder, then rename."""
    root = checkpoint_root(run_directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    staging = root / f".checkpoint-{step}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        write_contents(staging)
        (staging / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        _fsync_tree(staging)
        (staging / COMPLETE_MARKER).write_text("ok\n")
        _fsync_tree(staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in complete_checkpoints(run_directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / TRAINER_STATE).read_text())


def _fsync_tree(directory: Path) -> None:
    """Flush written files so a complete marker never precedes its data on disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
