"""The ``crossmetric`` command: train, evaluate, export, push, index build, search.

``crossmetric train`` with no arguments is the main job: the glyph benchmark from ImageNet weights that pip brings,
with the cross-image-attention head, evaluated on unseen classes and exported to ``outputs/<run>/model``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from collections.abc import Callable, Sequence

COMMANDS = ("train", "evaluate", "export", "push", "index", "search")


def train_command(argv: Sequence[str]) -> int:
    """``crossmetric train [--config RECIPE_OR_YAML] [--field value ...]``."""
    import time

    from transformers import HfArgumentParser

    from ..training.config import RECIPES, TrainingConfig, load_config_values

    started = time.perf_counter()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(
        TrainingConfig,
        prog="crossmetric train",
        description="Train an embedder with cross-image attention. Every field can be overridden as --field value; "
        f"--config takes a recipe ({', '.join(RECIPES)}) or a YAML file of fields.",
    )
    parser.add_argument("--config", default=None, help="recipe name or YAML file; command-line fields win")
    values = load_config_values(known.config)
    parser.set_defaults(**values)
    config, *_ = parser.parse_args_into_dataclasses(args=list(rest), look_for_args_file=False)
    from ..training.config import write_text_atomic
    from ..training.trainer import CrossMetricTrainer

    trainer = CrossMetricTrainer(config)
    result = trainer.train()
    summary = {
        "run_directory": str(result.run_directory),
        "export_directory": str(result.export_directory) if result.export_directory else None,
        "global_step": result.global_step,
        "train_seconds": round(result.train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "median_step_seconds": result.median_step_seconds,
        "recipe": result.recipe,
        "zero_shot": result.zero_shot,
        "final": result.metrics,
        "selection_split": result.selection_split,
        "best": result.best_metrics,
        "validation": result.validation_curve,
    }
    if trainer.accelerator.is_main_process:
        write_text_atomic(result.run_directory / "summary.json", json.dumps(summary, indent=2))
        label = {"test": " (selected on test: the literature's optimistic protocol)", None: " (last model)"}
        print(f"test metrics of the exported model{label.get(result.selection_split, '')}: {_format(result.metrics)}")
        if result.zero_shot:
            print(
                f"Recall@1 {result.zero_shot['recall@1']:.4f} -> {result.metrics['recall@1']:.4f} "
                f"(MAP@R {result.zero_shot['map@r']:.4f} -> {result.metrics['map@r']:.4f}) on unseen test classes"
            )
        if result.best_metrics:
            print(f"selected: step {result.best_metrics['step']} on {result.selection_split}")
        print(f"exported to {result.export_directory}" if result.export_directory else "")
    return 0


def export_command(argv: Sequence[str]) -> int:
    """``crossmetric export --checkpoint RUN_OR_CHECKPOINT --output_dir DIR``."""
    parser = argparse.ArgumentParser(
        prog="crossmetric export",
        description="Export the embedding-only model (no head weights) of a training run or checkpoint, with its "
        "preprocessing config and model card.",
    )
    parser.add_argument("--checkpoint", required=True, help="a run folder (its latest checkpoint) or a checkpoint")
    parser.add_argument("--output_dir", required=True, help="where to write the exported model")
    parser.add_argument(
        "--onnx", action="store_true",
        help='also write onnx/model.onnx (fp32) and onnx/model_quantized.onnx (8-bit), checked against PyTorch; '
        'needs pip install "crossmetric[onnx]"',
    )  # fmt: skip
    parser.add_argument(
        "--onnx_recall", choices=("auto", "on", "off"), default="auto",
        help="Recall@1 of fp32 and 8-bit ONNX on the run's evaluation split (auto: for the glyph benchmark)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    from ..hub.export import export_checkpoint

    try:
        directory = export_checkpoint(args.checkpoint, args.output_dir, onnx=args.onnx, onnx_recall=args.onnx_recall)
    except ImportError as error:
        print(f"crossmetric export: error: {error}", file=sys.stderr)
        return 2
    print(f"exported to {directory}")
    return 0


def _subcommand(module: str, add_arguments: str, run: str, prog: str, description: str) -> Callable:
    def command(argv: Sequence[str]) -> int:
        import importlib

        target = importlib.import_module(module, __package__)
        parser = argparse.ArgumentParser(prog=prog, description=description)
        getattr(target, add_arguments)(parser)
        return int(getattr(target, run)(parser.parse_args(argv)) or 0)

    return command


def index_command(argv: Sequence[str]) -> int:
    """``crossmetric index build ...``."""
    if not argv or argv[0] != "build":
        print("usage: crossmetric index build --model DIR --images FOLDER --output_dir DIR [--kind exact|hnsw|ivf]")
        return 2
    build = _subcommand(
        ".retrieval",
        "add_index_build_arguments",
        "run_index_build",
        "crossmetric index build",
        "Embed a gallery (image folder or dataset) with an exported model and save a searchable index.",
    )
    return build(argv[1:])


HANDLERS: dict[str, Callable[[Sequence[str]], int]] = {
    "train": train_command,
    "export": export_command,
    "evaluate": _subcommand(
        ".evaluate",
        "add_evaluate_arguments",
        "run_evaluate",
        "crossmetric evaluate",
        "Embed a dataset's test split with a model, compute retrieval metrics and write a report with pictures.",
    ),
    "push": _subcommand(
        "..hub.push",
        "add_push_arguments",
        "run_push",
        "crossmetric push",
        "Upload an exported model (and its index) to the Hugging Face Hub.",
    ),
    "index": index_command,
    "search": _subcommand(
        ".retrieval",
        "add_search_arguments",
        "run_search",
        "crossmetric search",
        "Find the gallery images nearest to query images in a saved index.",
    ),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "datasets", "huggingface_hub", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: crossmetric {train,evaluate,export,push,index build,search} [--help]\n\n" + (__doc__ or ""))
        return 0
    command = argv[0]
    if command not in HANDLERS:
        print(f"crossmetric: unknown command {command!r}; choose one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    try:
        return HANDLERS[command](argv[1:])
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        # a user mistake (bad flag value, missing file): a clear message, no traceback
        print(f"crossmetric {command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # a full disk or quota is no bug either: say what happened and how to go on (the message does)
        print(f"crossmetric {command}: error: {error if error.filename else error.strerror}", file=sys.stderr)
        return 1


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))


if __name__ == "__main__":
    sys.exit(main())
