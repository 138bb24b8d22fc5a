"""``crossmetric push``: upload an exported model folder (and its index) to the Hugging Face Hub.

There is deliberately no ``--token`` option: a token on the command line ends up in shell history and process
listings. Use ``HF_TOKEN`` or ``hf auth login``. Exit codes: 0 pushed, 1 the Hub or network failed, 2 bad input.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..hub.push import DEFAULT_COMMIT_MESSAGE, HubPushError, push_to_hub_folder
from ..inference.loading import resolve_model
from .arguments import add_progress_argument, apply_progress, parse_and_run, report_error
from .logging_setup import add_log_level_argument

DESCRIPTION = "Upload an exported model (and its index) to the Hugging Face Hub."


def add_push_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``crossmetric push`` options to ``parser``.

    There is deliberately no ``--token`` option: a token on the command line ends up in shell history
    and process listings. Use ``HF_TOKEN`` or ``hf auth login``.
    """
    parser.add_argument(
        "--model", required=True, type=Path, help="exported model folder (holds config.json), or a run folder"
    )
    parser.add_argument("--repo-id", required=True, help="Hub repo as NAMESPACE/NAME")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request against main")
    parser.add_argument("--commit-message", default=None, help=f"default: {DEFAULT_COMMIT_MESSAGE!r}")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT or huggingface.co)")
    add_progress_argument(parser)  # the upload's bars
    return add_log_level_argument(parser)


def run_push(args: argparse.Namespace) -> int:
    """Run ``crossmetric push`` from parsed arguments; print the commit (and PR) URL; return an exit code.

    Exit codes: 0 pushed, 1 the Hub or network failed, 2 bad input.
    """
    apply_progress(args.progress)
    try:
        kind, folder = resolve_model(args.model)
        if kind != "export":
            what = "no such folder" if kind == "hub" else "a training checkpoint, not an exported model folder"
            raise ValueError(
                f"--model {str(args.model)!r}: {what}; pass the folder `crossmetric export` (or training) wrote."
            )
        commit = push_to_hub_folder(
            folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            create_pr=args.create_pr,
            commit_message=args.commit_message,
            endpoint=args.endpoint,
        )
    except ValueError as err:
        return report_error("push", err)
    except HubPushError as err:
        return report_error("push", err, code=1)
    print(commit.commit_url)
    if commit.pr_url:
        print(f"pull request: {commit.pr_url}")
    return 0


def main(argv: Sequence[str]) -> int:
    """Parse ``argv`` and run ``crossmetric push``."""
    return parse_and_run(argv, add_push_arguments, run_push, "crossmetric push", DESCRIPTION)
