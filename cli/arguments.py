"""Options and helpers shared by the ``crossmetric`` commands: ``--device``, ``--progress``, ``--backend``, the
one-line error message on stderr, and parsing then running a command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .logging_setup import progress_default


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device`` (default: cuda when available)."""
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda when available)")


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--progress/--no-progress`` (default: on a terminal only)."""
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=progress_default(),
        help="progress bars (default: on a terminal only)",
    )


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    """``--backend torch|onnx`` of ``index build`` and ``search``."""
    parser.add_argument(
        "--backend", choices=("torch", "onnx"), default="torch",
        help="torch (default), or onnx: ONNX Runtime on the CPU with the model's onnx/model.onnx (export --onnx)",
    )  # fmt: skip


def report_error(command: str, message: object, code: int = 2) -> int:
    """Print ``crossmetric COMMAND: error: MESSAGE`` on stderr; return the exit code ``code``."""
    print(f"crossmetric {command}: error: {message}", file=sys.stderr)
    return code


def parse_and_run(
    argv: Sequence[str],
    add_arguments: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], int],
    prog: str,
    description: str,
) -> int:
    """Parse ``argv`` with a parser of ``prog`` that ``add_arguments`` fills, and ``run`` the namespace."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    return run(add_arguments(parser).parse_args(list(argv)))
