"""The ``crossmetric`` command: a dispatcher to one module per command.

    crossmetric {train,evaluate,export,push,index build,search,serve} [--log_level LEVEL] [--help]

``crossmetric train`` with no arguments is the main job: the glyph benchmark from ImageNet weights that pip brings,
with the cross-image-attention head, evaluated on unseen classes and exported to ``outputs/<run>/model``.

``--output_dir`` is the parent folder of runs for ``train`` (a run writes ``OUTPUT_DIR/RUN_NAME/``) and the
target folder for ``evaluate``, ``export`` and ``index build``. ``--log_level`` (every command; default info)
sets crossmetric's messages; library chatter shows only with ``--log_level debug`` (see ``cli/logging_setup.py``).
"""

from __future__ import annotations

import errno
import importlib
import sys
from collections.abc import Sequence

from .arguments import explicit_progress, report_error
from .logging_setup import setup_logging, split_log_level

# command -> the module (in this package) whose ``main(argv) -> int`` runs it
COMMANDS = {
    "train": ".train",
    "evaluate": ".evaluate",
    "export": ".export",
    "push": ".push",
    "index": ".index",
    "search": ".search",
    "serve": ".serve",
}
USAGE = "usage: crossmetric {train,evaluate,export,push,index build,search,serve} [--log_level LEVEL] [--help]"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named by ``argv[0]`` (default ``sys.argv[1:]``) and return its exit code.

    A user mistake (bad flag value, missing file) is one line on stderr and exit code 2, not a traceback; a full
    disk is exit code 1 with the reason.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (__doc__ or ""))
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"crossmetric: unknown command {command!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    try:
        level, rest = split_log_level(argv[1:])
        rest = explicit_progress(rest)  # `--progress` alone never takes the next argument as its value
        setup_logging(level)
        run = importlib.import_module(COMMANDS[command], __package__).main
        return int(run(rest) or 0)
    except SystemExit as done:  # argparse: --help (0) or a usage error (2)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 2)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        # a user mistake (bad flag value, missing file): a clear message, no traceback
        return report_error(command, error)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk or quota is no bug either: say what happened and how to go on (the message does)
        return report_error(command, error if error.filename else error.strerror, code=1)


if __name__ == "__main__":
    sys.exit(main())
