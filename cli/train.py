"""``crossmetric train``: train an embedder; with no arguments, the main job (glyph benchmark, ImageNet weights).

``--output_dir`` is the *parent* of runs here: a run writes ``OUTPUT_DIR/RUN_NAME/`` (checkpoints, log, summary)
and exports its model to ``OUTPUT_DIR/RUN_NAME/model``. Every other command's ``--output_dir`` is the target folder.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from .logging_setup import add_log_level_argument, progress_default


def build_parser(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser of ``crossmetric train`` with the defaults of ``--config`` (a recipe or YAML file) in ``argv``
    applied, and the other arguments. Its bool fields take ``--field``, ``--field true|false`` and ``--no-field``
    (``HfArgumentParser``), the spelling every command's ``--progress`` shares."""
    from transformers import HfArgumentParser

    from ..training.config import RECIPES, TrainingConfig, load_config_values

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(list(argv))
    parser = HfArgumentParser(
        TrainingConfig,
        prog="crossmetric train",
        description="Train an embedder with cross-image attention. --output_dir is the parent folder of runs (a run "
        "writes OUTPUT_DIR/RUN_NAME/, its model OUTPUT_DIR/RUN_NAME/model). Every field can be set as --field value; "
        f"--config takes a recipe ({', '.join(RECIPES)}) or a YAML file of fields.",
    )
    parser.add_argument("--config", default=None, help="recipe name or YAML file; command-line fields win")
    add_log_level_argument(parser)
    parser.set_defaults(progress=progress_default())  # a recipe, YAML file or --progress wins
    parser.set_defaults(**load_config_values(known.config))
    return parser, rest


def main(argv: Sequence[str]) -> int:
    """Run ``crossmetric train [--config RECIPE_OR_YAML] [--field value ...]``; return the exit code."""
    import time

    started = time.perf_counter()
    parser, rest = build_parser(argv)
    config, *_ = parser.parse_args_into_dataclasses(args=list(rest), look_for_args_file=False)
    from ..training.trainer import CrossMetricTrainer
    from ..utils.atomic_files import write_atomic

    trainer = CrossMetricTrainer(config)
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        if config.export:
            result.export()
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
            "reranker": result.reranker,
        }
        write_atomic(result.run_directory / "summary.json", json.dumps(summary, indent=2))
        label = {"test": " (selected on test: the literature's optimistic protocol)", None: " (the last model)"}
        print(f"test metrics of the exported model{label.get(result.selection_split, '')}: {_format(result.metrics)}")
        if result.zero_shot:
            before, after = result.zero_shot, result.metrics
            print(
                f"Recall@1 {before['recall@1']:.4f} -> {after['recall@1']:.4f}, MAP@R {before['map@r']:.4f} -> "
                f"{after['map@r']:.4f} on unseen test classes (before -> after training)"
            )
        if result.best_metrics:
            print(
                f"selected: the model of step {result.best_metrics['step']}, best on the {result.selection_split} split"
            )
        print(f"exported to {result.export_directory}" if result.export_directory else "")
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()  # leave the process group: gloo threads abort the interpreter at exit otherwise
    return 0


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
