"""The one logging policy of the ``crossmetric`` command, set up once by the dispatcher (``cli/main.py``).

What a user needs on screen is crossmetric's own messages: the plan, progress, metrics and where things were
written. Library chatter (faiss' loader trying AVX512 builds, accelerate's INFO line per saved file, datasets,
httpx, ...) stays behind ``--log_level``:

* ``--log_level info`` (the default): crossmetric's loggers at INFO, every library at WARNING;
* ``--log_level warning`` / ``error``: that level for everything;
* ``--log_level debug``: everything at DEBUG, libraries included.

Progress bars: when stderr is not a terminal (a log file, CI), the commands' ``--progress`` defaults to off
(:func:`progress_default`; the trainer's INFO line every ``logging_steps`` shows progress instead), bars asked for
with ``--progress True`` redraw at most every :data:`NON_TTY_MININTERVAL` seconds, and the Hugging Face libraries'
own bars are off, so a log file does not fill with thousands of carriage-return updates.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"
# Loggers of the libraries crossmetric uses: quiet unless --log_level debug.
LIBRARY_LOGGERS = (
    "faiss",
    "onnx_ir",
    "onnxscript",
    "accelerate",
    "datasets",
    "transformers",
    "huggingface_hub",
    "httpx",
    "httpx2",
    "httpcore",
    "urllib3",
    "filelock",
    "fsspec",
    "timm",
    "PIL",
    "matplotlib",
    "torch",
)
NON_TTY_MININTERVAL = 30.0  # seconds between progress-bar redraws in a log file
_HANDLER_NAME = "crossmetric-cli"


def add_log_level_argument(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--log_level`` to a command's parser (for its ``--help``; the dispatcher applies the value)."""
    parser.add_argument(
        "--log_level",
        type=str.lower,
        choices=LOG_LEVELS,
        default=DEFAULT_LOG_LEVEL,
        help="crossmetric's messages at this level; libraries (faiss, accelerate, datasets, ...) stay at warning "
        "unless debug (default: info)",
    )
    return parser


def progress_default() -> bool:
    """The default of ``--progress``: bars on a terminal, none in a log file."""
    return sys.stderr.isatty()


def split_log_level(argv: list[str]) -> tuple[str, list[str]]:
    """``(level, the other arguments)``: ``--log_level`` is taken out wherever it stands in ``argv``."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--log_level", type=str.lower, default=DEFAULT_LOG_LEVEL)
    known, rest = parser.parse_known_args(argv)
    if known.log_level not in LOG_LEVELS:
        raise ValueError(f"--log_level {known.log_level!r} is not one of {', '.join(LOG_LEVELS)}.")
    return known.log_level, rest


def setup_logging(level: str = DEFAULT_LOG_LEVEL) -> None:
    """Apply the policy above for ``level`` (one of :data:`LOG_LEVELS`); calling it again replaces the setup."""
    ours = getattr(logging, level.upper())
    libraries = ours if ours <= logging.DEBUG else max(ours, logging.WARNING)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(libraries)  # loggers of libraries not listed below
    logging.getLogger("crossmetric").setLevel(ours)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(libraries)
    # transformers and datasets reset their level from these variables when they configure their loggers
    verbosity = logging.getLevelName(libraries).lower()
    os.environ["TRANSFORMERS_VERBOSITY"] = verbosity
    os.environ["DATASETS_VERBOSITY"] = verbosity
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity(libraries)
    if "datasets" in sys.modules:
        import datasets

        datasets.logging.set_verbosity(libraries)
    _throttle_progress_bars()


def _throttle_progress_bars() -> None:
    """In a log file, redraw tqdm bars rarely (tqdm reads ``TQDM_*`` variables as defaults) and turn off the
    Hugging Face libraries' download and ``map`` bars."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("TQDM_MININTERVAL", str(NON_TTY_MININTERVAL))
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # already imported (``import crossmetric`` imports transformers): they read the variables too early
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
