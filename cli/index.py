"""``crossmetric index``: build a searchable index of a gallery, then change it and look into it.

    crossmetric index build --model MODEL --images FOLDER_OR_DATASET --output_dir INDEX [--kind exact|hnsw|ivf|ivfpq]
        [--shard_size N] [--max_memory 2G] [--refine R] [--metadata_columns COLUMN ...]
    crossmetric index add --index INDEX --images NEW [--model MODEL]
    crossmetric index remove --index INDEX (--ids ID ... | --ids_file FILE)
    crossmetric index compact --index INDEX
    crossmetric index info --index INDEX [--json]
    crossmetric index duplicates --index INDEX --threshold T [--output FILE]

``build`` embeds the gallery shard by shard (``--shard_size`` images each) into a work folder beside the output
(``.<name>.build/``): the same command run again after a kill continues from the first unfinished shard, and under
``accelerate launch`` each process embeds whole shards (see :mod:`crossmetric.retrieval.build`). With a model that has
a re-ranker (``reranker/``), each item's head tokens are stored too, in float16, for ``search --rerank_top_k``.

``add``, ``remove`` and ``compact`` change the index folder in place, atomically (a kill leaves the previous index
readable), and a running ``crossmetric serve`` answers from the changed index. The sub-commands other than ``build``
live in :mod:`.index_changes`. Exit codes: 0 success, 2 bad input (a clear message on stderr, before any model is
loaded or image embedded).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..inference.loading import resolve_model
from ..retrieval.shards import DEFAULT_SHARD_SIZE
from ..retrieval.storage import KINDS
from .arguments import (
    apply_progress,
    explicit_progress,
    report_error,
)
from .index_inputs import add_gallery_arguments, load_images  # noqa: F401 (load_images: cli.milvus_arguments)
from .logging_setup import add_log_level_argument
from .milvus_arguments import add_milvus_arguments, run_if_milvus

SUBCOMMANDS = ("build", "add", "remove", "compact", "info", "duplicates")
DEFAULT_MAX_MEMORY = "2G"


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
    parser.add_argument("--kind", choices=KINDS, default="exact", help=f"{', '.join(KINDS)} (default: exact)")
    parser.add_argument(
        "--shard_size", type=int, default=DEFAULT_SHARD_SIZE,
        help=f"images per shard (default {DEFAULT_SHARD_SIZE:,}): each finished shard is kept, so a rerun after a "
        "kill loses at most one; under accelerate launch each process takes whole shards",
    )  # fmt: skip
    parser.add_argument(
        "--max_memory", default=DEFAULT_MAX_MEMORY,
        help="ivfpq: the memory budget its lists and code size are chosen for, e.g. 512M, 2G (default 2G)",
    )  # fmt: skip
    parser.add_argument(
        "--refine", type=int, default=None,
        help="ivfpq: search k × REFINE candidates and re-score them exactly (default: the measured default)",
    )  # fmt: skip
    parser.add_argument("--ef_search", type=int, default=None, help="HNSW search width (default: calibrated)")
    parser.add_argument("--nprobe", type=int, default=None, help="IVF lists per query (default: calibrated)")
    parser.add_argument("--target_recall", type=float, default=0.95, help="recall@10 the calibration aims for")
    add_gallery_arguments(parser)
    add_milvus_arguments(parser, instead_of="--output_dir", index_type=True)  # or into a Milvus collection
    return add_log_level_argument(parser)


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def index_options(ns: argparse.Namespace) -> dict[str, Any]:
    """The index settings of ``build``: the search settings, and ``ivfpq``'s budget and re-scoring (checked)."""
    options: dict[str, Any] = {"ef_search": ns.ef_search, "nprobe": ns.nprobe, "target_recall": ns.target_recall}
    if ns.kind == "ivfpq":
        from ..retrieval.ivfpq import parse_memory

        options["max_memory"] = parse_memory(ns.max_memory)
        if ns.refine is not None:
            options["refine"] = ns.refine
    elif ns.refine is not None or ns.max_memory != DEFAULT_MAX_MEMORY:
        raise ValueError(f"--max_memory and --refine are settings of --kind ivfpq, not of --kind {ns.kind}.")
    if ns.refine is not None and ns.refine < 1:
        raise ValueError(f"--refine must be >= 1, got {ns.refine}.")
    return options


def run_index_build(ns: argparse.Namespace) -> int:
    """Run ``crossmetric index build``; print the index summary and where it was saved."""
    from ..retrieval.build import build_index_distributed, build_index_sharded

    apply_progress(ns.progress)
    milvus = run_if_milvus(ns, "index build", "--output_dir", load_images)
    if milvus is not None:
        return milvus
    try:
        resolve_model(ns.model)
        if ns.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {ns.batch_size}.")
        if ns.shard_size < 1:
            raise ValueError(f"--shard_size must be >= 1, got {ns.shard_size}.")
        if ns.output_dir.exists() and not ns.output_dir.is_dir():
            raise ValueError(f"--output_dir {str(ns.output_dir)!r} is a file.")
        settings = index_options(ns)
        images = load_images(ns)
    except (ValueError, FileNotFoundError) as error:
        return report_error("index build", error)
    options = {
        "kind": ns.kind,
        "shard_size": ns.shard_size,
        "batch_size": ns.batch_size,
        "progress": ns.progress,
        "num_workers": ns.num_workers,
        "image_column": ns.image_column,
        "label_column": ns.label_column,
        "id_column": ns.id_column,
        "metadata_columns": ns.metadata_columns,
        "backend": ns.backend,
        **settings,
    }
    try:
        if _distributed():
            index = build_index_distributed(ns.model, images, ns.output_dir, **options)
        else:
            import torch

            device = ns.device or ("cuda" if torch.cuda.is_available() and ns.backend == "torch" else "cpu")
            index = build_index_sharded(ns.model, images, ns.output_dir, device=device, **options)
    except (ValueError, FileNotFoundError, ImportError) as error:
        return report_error("index build", error)
    if index is not None:
        print(f"{index} saved to {ns.output_dir}")
        tokens = index.head_tokens_info()
        if tokens is not None:  # the model has a re-ranker: search --rerank_top_k can use them
            shape = "×".join(map(str, tokens["shape"]))
            print(f"stored for re-ranking: head tokens {shape} float16 ({tokens['bytes_per_item']} bytes per item)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """``crossmetric index`` with its sub-commands."""
    from .index_changes import (
        add_index_add_arguments,
        add_index_compact_arguments,
        add_index_duplicates_arguments,
        add_index_info_arguments,
        add_index_remove_arguments,
    )

    parser = argparse.ArgumentParser(
        prog="crossmetric index", description="Build retrieval indexes, change them and look into them."
    )
    add_log_level_argument(parser)
    commands = parser.add_subparsers(dest="subcommand", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    helps = {
        "build": (add_index_build_arguments, "embed a gallery (image folder or dataset) with a model and save a "
                  "searchable index; a rerun after a kill continues from the last finished shard"),
        "add": (add_index_add_arguments, "embed new images and add them to an index (an existing id is replaced)"),
        "remove": (add_index_remove_arguments, "remove items from an index by id"),
        "compact": (add_index_compact_arguments, "rewrite an index without its removed rows"),
        "info": (add_index_info_arguments, "kind, items, removed rows awaiting compaction, bytes on disk, model"),
        "duplicates": (add_index_duplicates_arguments, "write the groups of near-duplicate items as JSON Lines"),
    }  # fmt: skip
    for name in SUBCOMMANDS:
        add, text = helps[name]
        add(
            commands.add_parser(
                name, prog=f"crossmetric index {name}", help=text, description=text[0].upper() + text[1:] + "."
            )
        )
    return parser


def main(argv: Sequence[str]) -> int:
    """Parse ``argv`` (``SUBCOMMAND ...``) and run the sub-command."""
    from .index_changes import RUNS

    ns = build_parser().parse_args(explicit_progress(argv))
    return run_index_build(ns) if ns.subcommand == "build" else RUNS[ns.subcommand](ns)
