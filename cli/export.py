"""``crossmetric export``: the embedding-only model (no head weights) of a training run or checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .arguments import add_progress_argument, apply_progress, explicit_progress, report_error
from .logging_setup import add_log_level_argument


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``crossmetric export``."""
    parser = argparse.ArgumentParser(
        prog="crossmetric export",
        description="Export the embedding-only model (no head weights) of a training run or checkpoint, with its "
        "preprocessing config and model card.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a run folder (the model it selected on validation; else its latest checkpoint) or one checkpoint folder",
    )
    parser.add_argument(
        "--output_dir", required=True, help="the folder to write the exported model to (replaced as a whole)"
    )
    parser.add_argument(
        "--onnx", action="store_true",
        help='also write onnx/model.onnx (fp32) and onnx/model_quantized.onnx (8-bit), checked against PyTorch; '
        'needs pip install "crossmetric[onnx]"',
    )  # fmt: skip
    parser.add_argument(
        "--onnx_recall", choices=("auto", "on", "off"), default="auto",
        help="Recall@1 of fp32 and 8-bit ONNX on the run's evaluation split (auto: for the glyph benchmark)",
    )  # fmt: skip
    add_progress_argument(parser)
    return add_log_level_argument(parser)


def main(argv: Sequence[str]) -> int:
    """Run ``crossmetric export``; print where the model was written."""
    args = build_parser().parse_args(explicit_progress(argv))
    apply_progress(args.progress)
    from ..hub.export import export_checkpoint

    try:
        directory = export_checkpoint(args.checkpoint, args.output_dir, onnx=args.onnx, onnx_recall=args.onnx_recall)
    except ImportError as error:  # the onnx extra is missing: the message names the pip command
        return report_error("export", error)
    print(f"exported to {directory}")
    return 0
