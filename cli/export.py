"""``crossmetric export``: the embedding-only model (no head weights) of a training run or checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .logging_setup import add_log_level_argument


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``crossmetric export``."""
    parser = argparse.ArgumentParser(
        prog="crossmetric export",
        description="Export the embedding-only model (no head weights) of a training run or checkpoint, with its "
        "preprocessing config and model card.",
    )
    parser.add_argument("--checkpoint", required=True, help="a run folder (its latest checkpoint) or a checkpoint")
    parser.add_argument(
        "--output_dir", required=True, help="the folder to write the exported model to (replaced as a whole)"
    )
    return add_log_level_argument(parser)


def main(argv: Sequence[str]) -> int:
    """Run ``crossmetric export``; print where the model was written."""
    args = build_parser().parse_args(list(argv))
    from ..hub.export import export_checkpoint

    print(f"exported to {export_checkpoint(args.checkpoint, args.output_dir)}")
    return 0
