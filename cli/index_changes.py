"""``crossmetric index add | remove | compact | info | duplicates``: change a saved index and look into it.

    crossmetric index add --index INDEX --images NEW [--model MODEL]
    crossmetric index remove --index INDEX (--ids ID ... | --ids_file FILE)
    crossmetric index compact --index INDEX
    crossmetric index info --index INDEX [--json]
    crossmetric index duplicates --index INDEX --threshold T [--output FILE]

Each change is written next to the index and swapped in (its ``metadata.json`` last), so a kill leaves the previous
index readable and a running ``crossmetric serve`` reloads the changed one. ``add`` embeds with the model the index
records unless ``--model`` names one, and refuses a model other than the one that built the index, naming both,
before any image is embedded; an id already in the index is replaced (upsert). ``remove`` keeps the rows on disk as
tombstones until ``compact`` rewrites the index without them (HNSW graphs cannot drop a node in place).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .arguments import apply_progress, report_error
from .index_inputs import add_gallery_arguments, load_images, read_ids
from .logging_setup import add_log_level_argument
from .milvus_arguments import add_milvus_arguments, run_if_milvus


def _add_index_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, type=Path, help="the index folder (changed in place, atomically)")


def add_index_add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``crossmetric index add``."""
    _add_index_argument(parser)
    parser.add_argument(
        "--images", required=True,
        help="new images: a folder (ids = paths relative to it) or a dataset; an id already in the index is replaced",
    )  # fmt: skip
    parser.add_argument(
        "--model", default=None,
        help="the model to embed with (default: the one the index records); another model than the index's is refused",
    )  # fmt: skip
    add_gallery_arguments(parser)
    add_milvus_arguments(parser, instead_of="--index")
    return add_log_level_argument(parser)


def add_index_remove_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``crossmetric index remove``."""
    from .arguments import add_progress_argument

    _add_index_argument(parser)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--ids", nargs="+", metavar="ID", help="ids of the items to remove")
    which.add_argument("--ids_file", type=Path, help="a text file with one id per line (blank lines are skipped)")
    add_progress_argument(parser)
    add_milvus_arguments(parser, instead_of="--index")
    return add_log_level_argument(parser)


def add_index_compact_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``crossmetric index compact``."""
    from .arguments import add_progress_argument

    _add_index_argument(parser)
    add_progress_argument(parser)
    return add_log_level_argument(parser)


def add_index_info_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``crossmetric index info``."""
    from .arguments import add_progress_argument

    _add_index_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_progress_argument(parser)
    add_milvus_arguments(parser, instead_of="--index")
    return add_log_level_argument(parser)


def add_index_duplicates_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``crossmetric index duplicates``."""
    from .arguments import add_progress_argument

    _add_index_argument(parser)
    parser.add_argument(
        "--threshold", required=True, type=float,
        help="cosine similarity at or above which two items are near duplicates (e.g. 0.95)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=None, help="JSON Lines file to write (default: stdout)")
    add_progress_argument(parser)
    return add_log_level_argument(parser)


def _load(folder: Path) -> Any:
    """The index folder ``--index``, bound to it (every change is persisted there)."""
    from ..retrieval.index import EmbeddingIndex

    if not folder.is_dir():
        raise ValueError(f"--index {str(folder)!r}: no such index folder.")
    return EmbeddingIndex.load(folder)


def run_index_add(ns: argparse.Namespace) -> int:
    """Embed ``--images`` with the index's model and add them; print what was added."""
    milvus = run_if_milvus(ns, "index add", "--index", load_images)
    if milvus is not None:
        return milvus
    from ..retrieval.build import embed_for_index

    apply_progress(ns.progress)
    try:
        if ns.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {ns.batch_size}.")
        index = _load(ns.index)
        images = load_images(ns)
    except (ValueError, FileNotFoundError) as error:
        return report_error("index add", error)
    device = ns.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() and ns.backend == "torch" else "cpu"
    gallery = embed_for_index(
        index, images, ns.model, batch_size=ns.batch_size, device=device, progress=ns.progress,
        num_workers=ns.num_workers, image_column=ns.image_column, label_column=ns.label_column,
        id_column=ns.id_column, metadata_columns=ns.metadata_columns, backend=ns.backend,
    )  # fmt: skip
    before = len(index)
    index.add(
        gallery.embeddings, gallery.ids, gallery.labels, gallery.paths, gallery.metadata,
        head_tokens=gallery.head_tokens, model=gallery.model,
    )  # fmt: skip
    replaced = before + len(gallery.ids) - len(index)
    print(
        f"added {len(gallery.ids)} items to {ns.index} ({replaced} replaced an item of the same id); {len(index)} now"
    )
    return 0


def run_index_remove(ns: argparse.Namespace) -> int:
    """Remove the ids; print how many were in the index."""
    milvus = run_if_milvus(ns, "index remove", "--index", read_ids)
    if milvus is not None:
        return milvus
    try:
        ids = read_ids(ns)
        index = _load(ns.index)
    except (ValueError, FileNotFoundError) as error:
        return report_error("index remove", error)
    removed = index.remove(ids)
    absent = len(set(ids)) - removed
    note = f" ({absent} ids were not in it)" if absent else ""
    print(f"removed {removed} items from {ns.index}{note}; {len(index)} left")
    return 0


def run_index_compact(ns: argparse.Namespace) -> int:
    """Rewrite the index without its removed rows; print the sizes before and after."""
    try:
        index = _load(ns.index)
    except (ValueError, FileNotFoundError) as error:
        return report_error("index compact", error)
    before = describe(index.info())
    index.compact()
    print(f"compacted {ns.index}: {before} -> {describe(index.info())}")
    return 0


def describe(info: dict[str, Any]) -> str:
    """``N items, R removed rows, B bytes on disk`` of an ``info()``."""
    return (
        f"{info.get('count')} items, {info.get('removed', 0)} removed rows, {info.get('bytes_on_disk')} bytes on disk"
    )


def run_index_info(ns: argparse.Namespace) -> int:
    """Print the index's ``info()``: kind, count, removed rows awaiting compaction, bytes on disk, model, ..."""
    milvus = run_if_milvus(ns, "index info", "--index")
    if milvus is not None:
        return milvus
    try:
        info = _load(ns.index).info()
    except (ValueError, FileNotFoundError) as error:
        return report_error("index info", error)
    if ns.json:
        print(json.dumps(info, ensure_ascii=False, default=str))
        return 0
    for key, value in info.items():
        shown = json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, (dict, list)) else value
        print(f"{key}: {shown}")
    return 0


def run_index_duplicates(ns: argparse.Namespace) -> int:
    """Write the near-duplicate groups as JSON Lines (``--output`` or stdout); say how many."""
    from ..utils.atomic_files import write_atomic

    try:
        if not -1.0 <= ns.threshold <= 1.0:
            raise ValueError(f"--threshold is a cosine similarity between -1 and 1, got {ns.threshold}.")
        if ns.output is not None and ns.output.is_dir():
            raise ValueError(f"--output {str(ns.output)!r} is a folder: name a file.")
        index = _load(ns.index)
    except (ValueError, FileNotFoundError) as error:
        return report_error("index duplicates", error)
    groups = index.near_duplicates(ns.threshold, progress=ns.progress)
    lines = "".join(
        json.dumps({"size": len(ids), "ids": ids, "items": index.records(ids)}, ensure_ascii=False, default=str) + "\n"
        for ids in groups
    )  # one line per group: its ids, and each item's id, label, path and metadata
    items = sum(len(ids) for ids in groups)
    if ns.output is None:
        sys.stdout.write(lines)
    else:
        write_atomic(ns.output, lines)
    where = f" to {ns.output}" if ns.output is not None else ""
    print(
        f"{len(groups)} groups of near duplicates ({items} items) at cosine >= {ns.threshold}{where}", file=sys.stderr
    )
    return 0


RUNS: dict[str, Callable[[argparse.Namespace], int]] = {
    "add": run_index_add,
    "remove": run_index_remove,
    "compact": run_index_compact,
    "info": run_index_info,
    "duplicates": run_index_duplicates,
}
