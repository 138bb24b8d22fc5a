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


TRUE_WORDS = ("true", "t", "yes", "y", "on", "1")
FALSE_WORDS = ("false", "f", "no", "n", "off", "0")
PROGRESS_OPTIONS = ("--progress", "--no-progress", "--no_progress")


def parse_bool(value: str, flag: str = "--progress") -> bool:
    """``true``/``false`` (and yes/no, on/off, 1/0, any case) as a bool; ``ValueError`` naming ``flag`` otherwise."""
    word = str(value).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{flag} takes true or false, got {value!r}.")


class ProgressAction(argparse.Action):
    """``--progress`` alone, ``--progress true|false`` or ``--progress=true|false``: the spelling of ``crossmetric
    train`` (transformers' ``HfArgumentParser`` bool fields), shared by every command."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        kwargs.update(nargs="?", const=True, metavar="true|false")
        super().__init__(option_strings, dest, **kwargs)  # type: ignore[arg-type]

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object, _: object = None
    ) -> None:
        try:
            setattr(namespace, self.dest, values if isinstance(values, bool) else parse_bool(str(values)))
        except ValueError as error:
            parser.error(str(error))


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    """``--progress [true|false]`` and ``--no-progress`` (default: on a terminal only), as ``crossmetric train``."""
    parser.add_argument(
        "--progress",
        action=ProgressAction,
        default=progress_default(),
        help="progress bars: --progress, --progress true|false or --no-progress (default: on a terminal only)",
    )
    parser.add_argument(
        "--no-progress", "--no_progress", dest="progress", action="store_false", help="no progress bars"
    )


def explicit_progress(argv: Sequence[str]) -> list[str]:
    """``argv`` with ``--progress`` spelled ``--progress=VALUE``, so that a bare ``--progress`` never swallows the
    next argument (a query image of ``crossmetric search``) as its value: ``--progress false`` becomes
    ``--progress=false``, a bare ``--progress`` becomes ``--progress=true``. Arguments after ``--`` are left alone."""
    out, rest = [], list(argv)
    while rest:
        item = rest.pop(0)
        if item == "--":
            return out + [item] + rest
        if item != "--progress":
            out.append(item)
        elif rest and rest[0].strip().lower() in TRUE_WORDS + FALSE_WORDS:
            out.append(f"--progress={rest.pop(0)}")
        else:
            out.append("--progress=true")
    return out


def apply_progress(enabled: bool) -> None:
    """The Hugging Face libraries' own bars (Hub downloads and uploads, ``datasets``) on or off, as ``--progress``
    says: for the commands whose only bars are theirs (``search``, ``serve``, ``export``, ``push``, ``index``)."""
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if enabled else disable_progress_bars)()


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
    return run(add_arguments(parser).parse_args(explicit_progress(argv)))
