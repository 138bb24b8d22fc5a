"""What the ``crossmetric index`` sub-commands read from the command line: a gallery (``build``, ``add``, and the
``--milvus`` forms of both) and a list of ids (``remove``). Kept apart from the commands so that the modules that run
them (:mod:`.index`, :mod:`.index_changes`, :mod:`.milvus_arguments`) import it and not one another."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .arguments import add_backend_argument, add_device_argument, add_progress_argument


def add_gallery_arguments(parser: argparse.ArgumentParser) -> None:
    """How a gallery is read and embedded: shared by ``build`` and ``add``."""
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_workers", type=int, default=0, help="image decoding worker processes")
    parser.add_argument("--split", default=None, help="dataset split (needed when a dataset has several)")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--id_column", default=None, help="dataset column with ids (default: row number)")
    parser.add_argument(
        "--metadata_columns", nargs="+", default=None, metavar="COLUMN",
        help="dataset columns kept with each item, for search --filter COLUMN=VALUE (a dataset gallery only)",
    )  # fmt: skip
    add_device_argument(parser)
    add_backend_argument(parser)
    add_progress_argument(parser)


def load_images(ns: argparse.Namespace) -> Any:
    """The ``--images`` value as a folder path or a ``datasets.Dataset`` (one split)."""
    path = Path(ns.images)
    if not path.exists() and (ns.images.startswith((".", "/", "~")) or ns.images.count("/") > 1):
        raise ValueError(f"--images {ns.images!r}: no such folder.")
    if path.is_dir() and not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        if ns.metadata_columns:
            raise ValueError(
                f"--metadata_columns needs a dataset gallery: --images {ns.images!r} is an image folder, whose only "
                "column is its sub-folder names (the labels)."
            )
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
    missing = [c for c in ns.metadata_columns or () if c not in loaded.column_names]
    if missing:
        raise ValueError(
            f"--metadata_columns {missing}: not columns of {ns.images!r} (its columns: {loaded.column_names})."
        )
    return loaded


def read_ids(ns: argparse.Namespace) -> list[str]:
    """The ids of ``--ids`` or ``--ids_file`` (one per line, surrounding blanks and blank lines dropped)."""
    if ns.ids is not None:
        return list(ns.ids)
    if not ns.ids_file.is_file():
        raise ValueError(f"--ids_file {str(ns.ids_file)!r}: no such file.")
    return [line.strip() for line in ns.ids_file.read_text(encoding="utf-8").splitlines() if line.strip()]
