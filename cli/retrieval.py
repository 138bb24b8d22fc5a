"""``crossmetric index build`` and ``crossmetric search``: build a retrieval index from images, query it.

The lead's CLI adds these options to its sub-parsers and calls the ``run_*`` functions, which return an exit code:
0 success, 2 bad input (a clear message on stderr, before any model is loaded or image embedded).

    crossmetric index build --model EXPORT --images FOLDER_OR_DATASET --output_dir INDEX [--kind exact|hnsw|ivf]
    crossmetric search --model EXPORT --index INDEX query.jpg [more.jpg ...] [--top_k 5] [--json]

``index build`` under ``accelerate launch`` with several processes builds in parallel (each process embeds a
shard; see :func:`~crossmetric.retrieval.build.build_index_distributed`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..retrieval.storage import KINDS


def add_index_build_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``crossmetric index build``."""
    parser.add_argument("--model", required=True, help="exported model folder (or Hub id)")
    parser.add_argument(
        "--images",
        required=True,
        help="image folder (labels = sub-folder names), a dataset saved with save_to_disk, or a Hub dataset id",
    )
    parser.add_argument("--output_dir", required=True, type=Path, help="folder to write the index to")
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
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda when available)")
    _add_backend_argument(parser)
    return parser


def add_search_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``crossmetric search``."""
    parser.add_argument("--model", required=True, help="exported model folder (or Hub id)")
    parser.add_argument("--index", default=None, help="index folder or Hub repo id (default: the model's index/)")
    parser.add_argument("images", nargs="+", help="query image files")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object per query")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda when available)")
    _add_backend_argument(parser)
    return parser


def _add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", choices=("torch", "onnx"), default="torch",
        help="torch (default), or onnx: ONNX Runtime on the CPU with the model's onnx/model.onnx (export --onnx)",
    )  # fmt: skip


def _error(command: str, message: str) -> int:
    print(f"crossmetric {command}: error: {message}", file=sys.stderr)
    return 2


def _check_model(value: str) -> None:
    path = Path(value)
    if path.exists() and not (path / "config.json").is_file():
        raise ValueError(f"--model {value!r} has no config.json: pass a folder written by the model export.")


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
        _check_model(ns.model)
        if ns.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {ns.batch_size}.")
        if ns.output_dir.exists() and not ns.output_dir.is_dir():
            raise ValueError(f"--output_dir {str(ns.output_dir)!r} is a file.")
        if not Path(ns.images).exists() and (ns.images.startswith((".", "/", "~")) or ns.images.count("/") > 1):
            raise ValueError(f"--images {ns.images!r}: no such folder.")
        images = _load_images(ns)
    except (ValueError, FileNotFoundError) as error:
        return _error("index build", str(error))
    options = {
        "kind": ns.kind,
        "batch_size": ns.batch_size,
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
        return _error("index build", str(error))
    if index is not None:
        print(f"{index} saved to {ns.output_dir}")
    return 0


def run_search(ns: argparse.Namespace) -> int:
    """Run ``crossmetric search``: the ``top_k`` nearest entries for each query image, as text or JSON lines."""
    from transformers import pipeline

    from ..retrieval.pipeline import TASK, register_retrieval_pipeline

    try:
        _check_model(ns.model)
        if ns.top_k < 1:
            raise ValueError(f"--top_k must be >= 1, got {ns.top_k}.")
        missing = [image for image in ns.images if not Path(image).is_file()]
        if missing:
            raise ValueError(f"query image(s) not found: {', '.join(missing)}.")
        if ns.backend == "onnx":
            from ..retrieval.onnx_search import search_with_onnx

            results = search_with_onnx(ns.model, ns.index, list(ns.images), ns.top_k)
        else:
            register_retrieval_pipeline()
            kwargs = {"index": ns.index} if ns.index else {}
            retrieve = pipeline(TASK, model=ns.model, top_k=ns.top_k, device=ns.device, **kwargs)
            results = retrieve(list(ns.images))
    except (ValueError, FileNotFoundError, ImportError) as error:
        return _error("search", str(error))
    for image, hits in zip(ns.images, results):
        if ns.json:
            print(json.dumps({"query": image, "results": hits}, ensure_ascii=False))
            continue
        print(image)
        for rank, hit in enumerate(hits, 1):
            label = f"  [{hit['label']}]" if hit["label"] is not None else ""
            print(f"  {rank:>3}. {hit['score']:.4f}  {hit['id']}{label}")
    return 0
