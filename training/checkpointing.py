"""Checkpoint folders that are either complete or ignored.

A checkpoint is written into a hidden temporary folder, completed with a ``COMPLETE`` marker, then renamed into
place; ``latest`` is resolved by scanning for complete folders, so a run killed during a write (or a full disk)
never leaves a half-written checkpoint that a resume would take for a good one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..inference.run_folder import COMPLETE_MARKER, TRAINER_STATE, checkpoint_root, complete_checkpoints
from ..utils.fault_points import fault_point


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
    replaced = None
    try:
        staging.mkdir()
        write_contents(staging)
        fault_point("checkpoint_write")  # test hook: the contents are written, the folder is not yet complete
        (staging / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        _fsync_tree(staging)
        (staging / COMPLETE_MARKER).write_text("ok\n")
        _fsync_tree(staging)
        replaced = _move_aside(final)  # the same step saved twice (save_steps and an epoch end)
        os.replace(staging, final)
    except BaseException as error:
        disk_full = isinstance(error, Exception) and _is_disk_full(error, root)
        if replaced is not None and not final.exists():
            os.replace(replaced, final)  # the swap failed: put the previous checkpoint back
        shutil.rmtree(staging, ignore_errors=True)
        if disk_full:
            last = complete_checkpoints(run_directory)
            raise OSError(
                errno.ENOSPC,
                f"No space left on the device while writing checkpoint-{step} under {root}. The incomplete "
                f"checkpoint was removed; the last complete one ({last[-1] if last else 'none yet'}) is intact. "
                "Free some space, lower --save_total_limit or choose an --output_dir on a larger disk, then "
                "resume with --resume_from_checkpoint latest.",
            ) from error
        raise
    for doomed in [replaced, *map(_move_aside, complete_checkpoints(run_directory)[:-keep])]:
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)
    return final


def _move_aside(checkpoint: Path) -> Path | None:
    """Rename a checkpoint folder out of the ``checkpoint-N`` namespace, to be deleted afterwards: a run killed
    half way through a deletion must not leave a folder that looks complete but lacks files."""
    if not checkpoint.exists():
        return None
    doomed = checkpoint.with_name(f".{checkpoint.name}.deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    return doomed


def load_checkpoint(accelerator: Any, checkpoint: Path) -> None:
    """``accelerator.load_state(checkpoint)``, with one clear error for a checkpoint that cannot be loaded.

    Accelerate reads the weights from safetensors and the optimizer, scheduler and RNG pickles with
    ``torch.load(weights_only=True)``, which refuses pickled code. It ignores an RNG file it cannot read, though,
    and the resumed run would then silently differ from an uninterrupted one; so that file is read first here,
    with the same safe loader, and any failure names the checkpoint.
    """
    from accelerate.utils import load as load_tensors_only  # torch.load(weights_only=True) + numpy RNG types

    try:
        load_tensors_only(checkpoint / f"random_states_{accelerator.process_index}.pkl")
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # noqa: BLE001 - safetensors, unpickling and shape errors all mean the same here
        text = str(error)
        if "WeightsUnpickler error:" in text:  # keep what torch refused, not its advice to unpickle anyway
            text = text.split("WeightsUnpickler error:", 1)[1].split(" was not an allowed global")[0].strip()
        detail = f"{type(error).__name__}: {text}"
        raise ValueError(
            f"--resume_from_checkpoint: cannot load {checkpoint} ({detail[:600]}). It is damaged, was written by "
            "another model or configuration, or holds pickled objects other than tensors (refused for safety). "
            "Resume from another checkpoint, or start the run anew."
        ) from error


def _is_disk_full(error: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC/EDQUOT anywhere in the chain (torch and safetensors wrap
    it in their own errors, sometimes without the code), or almost nothing left on the device."""
    current: BaseException | None = error
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(current) or "os error 28" in str(current):
            return True
        current = current.__cause__ or current.__context__
    try:
        return shutil.disk_usage(directory).free < 1 << 20
    except OSError:
        return False


def _fsync_tree(directory: Path) -> None:
    """Flush written files so a complete marker never precedes its data on disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
