"""The ``crossmetric`` command as a whole: every command answers ``--help``, and one logging policy.

The logging test runs ``crossmetric train`` on a tiny run in a real process with stderr going to a file, as a
newcomer's log file would: no faiss loader lines, no accelerate INFO lines, no carriage-return flood from progress
bars; ``--log_level debug`` shows the library lines again.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _fault_helpers import TINY_RUN, cli_args, cli_env
from _training_fixtures import make_shapes_folder

from crossmetric.cli import main as cli
from crossmetric.cli.logging_setup import split_log_level

HELP_COMMANDS = [
    [], ["train"], ["evaluate"], ["export"], ["push"], ["index"], ["index", "build"], ["search"], ["serve"],
]  # fmt: skip


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "crossmetric")
def test_every_command_answers_help_with_exit_0(command: list[str], capsys) -> None:
    assert cli.main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: crossmetric") and "--log_level" in out


def test_help_in_a_real_process() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "crossmetric.cli", "index", "--help"], env=cli_env(), capture_output=True, text=True
    )
    assert result.returncode == 0 and "build" in result.stdout, result.stderr[-2000:]


def test_output_dir_help_says_parent_for_train_and_target_elsewhere(capsys) -> None:
    cli.main(["train", "--help"])
    assert "parent folder of runs" in " ".join(capsys.readouterr().out.split())
    for command in (["evaluate"], ["export"], ["index", "build"]):
        cli.main([*command, "--help"])
        assert "the folder to write" in " ".join(capsys.readouterr().out.split()), command


def test_unknown_command_and_bad_log_level_exit_2(capsys) -> None:
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli.main(["export", "--log_level", "loud", "--checkpoint", "x", "--output_dir", "y"]) == 2
    assert "--log_level 'loud' is not one of debug, info, warning, error" in capsys.readouterr().err


def test_log_level_is_taken_out_wherever_it_stands() -> None:
    assert split_log_level(["--model", "m", "--log_level", "DEBUG", "q.jpg"]) == ("debug", ["--model", "m", "q.jpg"])
    assert split_log_level(["--logging_steps", "5"]) == ("info", ["--logging_steps", "5"])


def _train_log(tmp_path: Path, name: str, *extra: str) -> str:
    shapes = make_shapes_folder(tmp_path / "shapes")
    fields = {**TINY_RUN, "dataset": str(shapes), "num_epochs": 2, "run_name": name}
    del fields["progress"]  # the default: no bars when stderr is a file
    log = tmp_path / f"{name}.log"
    with open(log, "w") as stderr:
        argv = [sys.executable, "-m", "crossmetric.cli", "train", *cli_args(fields), "--output_dir", str(tmp_path)]
        result = subprocess.run([*argv, *extra], env=cli_env(), stdout=subprocess.PIPE, stderr=stderr, timeout=600)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    return text


def test_train_log_file_shows_no_library_chatter_and_no_progress_flood(tmp_path: Path) -> None:
    quiet = _train_log(tmp_path, "quiet")
    assert "faiss" not in quiet and "swigfaiss" not in quiet, quiet[:3000]
    assert "INFO accelerate" not in quiet, quiet[:3000]
    assert quiet.count("\r") < 50, f"{quiet.count(chr(13))} carriage returns"
    debug = _train_log(tmp_path, "debug", "--log_level", "debug")
    assert "faiss.loader" in debug and "accelerate" in debug, debug[:3000]
