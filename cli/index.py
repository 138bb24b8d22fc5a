"""``crossmetric index build``: embed a gallery (image folder or dataset) with a model and save a searchable index.

    crossmetric index build --model MODEL --images FOLDER_OR_DATASET --output_dir INDEX [--kind exact|hnsw|ivf]

With a model that has a re-ranker (``reranker/``), each gallery item's head tokens are stored too, in float16 (the
bytes per item are printed and recorded in ``metadata.json``), for ``search --rerank_top_k``.

``index build`` under ``accelerate launch`` with several processes builds in parallel (each process embeds a
shard; see :func:`~crossmetric.retrieval.build.build_index_distributed`). Exit codes: 0 success, 2 bad input (a
clear message on stderr, before any model is loaded or image embedded).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..inference.loading import resolve_model
from ..retrieval.storage import KINDS
from .arguments import add_backend_argument, add_device_argument, add_progress_argument, report_error
from .logging_setup import add_log_level_argument

SUBCOMMANDS = ("build",)


def add_index_build_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``crossmetric index build``."""
    parser.add_argument(
        "--model", required=True, help="exported model folder, training run folder, checkpoint, or Hub id"
    )
    parser.add_argument(
        "--images",
        required=True,
        help="image folder (labels = sub-folder names), a dataset saved with save_to_disk, or a Hub dataset id",
    )
    parser.add_argument(
        "--output_dir", required=True, type=Path, help="the folder to write the index to (replaced as a whole)"
    )
    parser.add_argument("--kind", choices=KINDS, default="exact", help="exact (default), hnsw or ivf")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0, help="image decoding worker processes")
    parser.add_argument("--split", default=None, help="dataset split (needed when a dataset has several)")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--id_column", default=None, help="dataset column with ids (default: row number)")
    parser.add_argument("--ef_search", type=int, default=None, help="HNSW search width (default: calibrated)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists per query (default: calibrated)")
    parser.add_argument("--target_recall", type=float, default=0.95, help="recall@10 the calibration aims for")
    add_device_argument(parser)
    add_backend_argument(parser)
    add_progress_argument(parser)
    return add_log_level_argument(parser)


def _load_images(ns: argparse.Namespace) -> Any:
    """The ``--images`` value as a folder path or a ``datasets.Dataset`` (one split)."""
    path = Path(ns.images)
    if path.is_dir() and not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return str(path)
    import datasets

    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
    elif path.exists():
        raise ValueError(f"--images {ns.images!r} is a file: pass an image folder or a dataset.")
    else:
        loaded = datasets.load_dataset(ns.images, split=ns.split) if ns.split else datasets.load_dataset(ns.images)
    if isinstance(loaded, datasets.DatasetDict):
        if ns.split is None and len(loaded) > 1:
            raise ValueError(f"--images {ns.images!r} has splits {list(loaded)}: pick one with --split.")
        if ns.split is not None and ns.split not in loaded:
            raise ValueError(f"--split {ns.split!r} is not a split of {ns.images!r} (splits: {list(loaded)}).")
        loaded = loaded[ns.split or next(iter(loaded))]
    return loaded


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_index_build(ns: argparse.Namespace) -> int:
    """Run ``crossmetric index build``; print the index summary and where it was saved."""
    from ..retrieval.build import build_index, build_index_distributed

    try:
        resolve_model(ns.model)
        if ns.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {ns.batch_size}.")
        if ns.output_dir.exists() and not ns.output_dir.is_dir():
            raise ValueError(f"--output_dir {str(ns.output_dir)!r} is a file.")
        if not Path(ns.images).exists() and (ns.images.startswith((".", "/", "~")) or ns.images.count("/") > 1):
            raise ValueError(f"--images {ns.images!r}: no such folder.")
        images = _load_images(ns)
    except (ValueError, FileNotFoundError) as error:
        return report_error("index build", error)
    options = {
        "kind": ns.kind,
        "batch_size": ns.batch_size,
        "progress": ns.progress,
        "num_workers": ns.num_workers,
        "image_column": ns.image_column,
        "label_column": ns.label_column,
        "id_column": ns.id_column,
        "ef_search": ns.ef_search,
        "nprobe": ns.nprobe,
        "target_recall": ns.target_recall,
        "backend": ns.backend,
    }
    try:
        if _distributed():
            index = build_index_distributed(ns.model, images, ns.output_dir, **options)
        else:
            import torch

            device = ns.device or ("cuda" if torch.cuda.is_available() and ns.backend == "torch" else "cpu")
            index = build_index(ns.model, images, device=device, **options)
            index.save(ns.output_dir)
    except (ValueError, FileNotFoundError, ImportError) as error:
        return report_error("index build", error)
    if index is not None:
        print(f"{index} saved to {ns.output_dir}")
        if index.head_tokens is not None:  # the model has a re-ranker: search --rerank_top_k can use them
            print(f"stored for re-ranking: {index.head_tokens.describe()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``crossmetric index`` with its ``build`` sub-command."""
    parser = argparse.ArgumentParser(prog="crossmetric index", description="Build retrieval indexes.")
    add_log_level_argument(parser)
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="{build}")
    add_index_build_arguments(
        commands.add_parser(
            "build",
            prog="crossmetric index build",
            help="embed a gallery with a model and save a searchable index",
            description="Embed a gallery (image folder or dataset) with a model and save a searchable index.",
        )
    )
    return parser


def main(argv: Sequence[str]) -> int:
    """Parse ``argv`` (``build ...``) and run the sub-command."""
    ns = build_parser().parse_args(list(argv))
    return run_index_build(ns)
