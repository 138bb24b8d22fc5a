"""``--milvus URI --collection NAME [--milvus_token T] [--milvus_index HNSW]``: a Milvus collection instead of a folder.

Every index command takes these flags in place of its folder (``index build``'s ``--output_dir``, the ``--index`` of
``index add | remove | info``, ``search`` and ``serve``):

    crossmetric index build --model MODEL --images FOLDER --milvus gallery.db --collection shoes
    crossmetric search --model MODEL --milvus gallery.db --collection shoes query.jpg
    crossmetric serve --model MODEL --milvus http://milvus:19530 --collection shoes

A URI that is a file ending in ``.db`` is Milvus Lite, inside the process; ``http(s)://host:port`` is a Milvus server
(one ``milvus-lite server`` on 127.0.0.1, Standalone, Distributed or Zilliz Cloud). The token may come from
``CROSSMETRIC_MILVUS_TOKEN`` instead of the command line (where other users of the machine can read it).

The commands call two things here: :func:`add_milvus_arguments` when they build their parser, and
:func:`open_milvus_index` / :func:`run_milvus_build` / :func:`run_milvus_change` when ``--milvus`` is given, so the
Milvus path stays in this file.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .arguments import report_error

TOKEN_VARIABLE = "CROSSMETRIC_MILVUS_TOKEN"
SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")


def add_milvus_arguments(
    parser: argparse.ArgumentParser, *, instead_of: str | None = None, index_type: bool = False
) -> argparse.ArgumentParser:
    """Add ``--milvus``, ``--collection``, ``--milvus_token`` (and ``--milvus_index`` for a build) to ``parser``.

    ``instead_of``: the folder option (``--output_dir``, ``--index``) that ``--milvus`` replaces; it stops being
    required, and :func:`check_target` asks for one of the two instead.
    """
    group = parser.add_argument_group('Milvus (pip install "crossmetric[milvus]")')
    group.add_argument(
        "--milvus", default=None, metavar="URI",
        help="a Milvus collection instead of a folder: a Milvus Lite file (gallery.db) or a server (http://host:19530)",
    )  # fmt: skip
    group.add_argument("--collection", default=None, help="the Milvus collection (with --milvus)")
    group.add_argument(
        "--milvus_token", default=None, help=f"the server's token, user:password or API key; or set {TOKEN_VARIABLE}"
    )
    if index_type:
        from ..retrieval.milvus_schema import DEFAULT_INDEX_TYPE, INDEX_TYPES

        group.add_argument(
            "--milvus_index", default=DEFAULT_INDEX_TYPE, type=str.upper, choices=INDEX_TYPES,
            help=f"the collection's vector index when it is created (default {DEFAULT_INDEX_TYPE}; FLAT is exact)",
        )  # fmt: skip
    if instead_of is not None:
        action = parser._option_string_actions[instead_of]  # argparse keeps no public way to relax an option
        action.required = False
        action.help = f"{action.help} (or --milvus URI --collection NAME)"
    return parser


def check_target(ns: argparse.Namespace, folder: str, *, required: bool = True) -> bool:
    """Whether the command targets Milvus. ``ValueError`` when both ``--milvus`` and ``folder`` (the folder option's
    name, e.g. ``--output_dir``) are given, when neither is and ``required`` (``search`` and ``serve`` fall back to the
    model's own ``index/``), when ``--milvus`` lacks ``--collection``, or when the extra is not installed."""
    given = getattr(ns, folder.lstrip("-"), None)
    if ns.milvus is None:
        if ns.collection is not None:
            raise ValueError("--collection names a Milvus collection: pass --milvus URI with it.")
        if required and given is None:
            raise ValueError(f"pass {folder}, or --milvus URI --collection NAME.")
        return False
    if given is not None:
        raise ValueError(f"pass either {folder} or --milvus, not both.")
    if not ns.collection:
        raise ValueError("--milvus needs --collection NAME (the collection to use in that Milvus).")
    check_uri(ns.milvus)
    from ..retrieval.milvus_schema import require_pymilvus

    require_pymilvus()
    return True


def check_uri(uri: str) -> str:
    """``uri`` if it names a Milvus server or a Milvus Lite database (``*.db`` in an existing folder; Milvus Lite 3
    keeps it as a folder of that name), else ValueError."""
    if uri.startswith(SERVER_SCHEMES):
        return uri
    path = Path(uri).expanduser()
    if path.suffix != ".db":
        raise ValueError(
            f"--milvus {uri!r}: pass a Milvus Lite file ending in .db (e.g. gallery.db) or a server URI "
            "(http://host:19530)."
        )
    if not path.parent.is_dir():
        raise ValueError(f"--milvus {uri!r}: the folder {str(path.parent)!r} does not exist.")
    return uri


def run_if_milvus(
    ns: argparse.Namespace, command: str, folder: str, read: Callable[[argparse.Namespace], Any] | None = None
) -> int | None:
    """When ``--milvus`` is given, run ``command`` (``index build | add | remove | info``) against the collection and
    return its exit code; else None (the command goes on with its ``folder`` option). ``read``: the command's own
    reading of its input (``build``/``add``: the images, ``remove``: the ids), passed in so that this module imports
    no command. Bad flags or input: exit code 2."""
    try:
        if not check_target(ns, folder):
            return None
        given = read(ns) if read is not None else None
    except (ValueError, FileNotFoundError, ImportError) as error:
        return report_error(command, error)
    if command in ("index build", "index add"):
        return run_milvus_build(ns, given, must_exist=command == "index add", command=command)
    return run_milvus_change(ns, command, given)


def token(ns: argparse.Namespace) -> str | None:
    """``--milvus_token``, else ``CROSSMETRIC_MILVUS_TOKEN``, else None."""
    return ns.milvus_token if ns.milvus_token is not None else os.environ.get(TOKEN_VARIABLE) or None


def milvus_location(ns: argparse.Namespace) -> Any:
    """The collection the flags name, to be opened later (``crossmetric serve`` opens it once its model is loaded)."""
    from ..retrieval.milvus_index import MilvusLocation

    return MilvusLocation(ns.milvus, ns.collection, token(ns))


def open_milvus_index(ns: argparse.Namespace) -> Any:
    """The existing collection the flags name (``ValueError`` saying how to build it when there is none)."""
    from ..retrieval.milvus_index import MilvusIndex

    return MilvusIndex(ns.milvus, ns.collection, token=token(ns))


def run_milvus_build(
    ns: argparse.Namespace, images: Any, *, must_exist: bool = False, command: str = "index build"
) -> int:
    """``index build`` (or ``index add``, ``must_exist``) into the collection: every process of an ``accelerate
    launch`` upserts its own shard; a rerun after a kill redoes the shards, idempotently (upserts by id)."""
    from ..retrieval.milvus_build import build_milvus_index

    accelerator = None
    try:
        if ns.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {ns.batch_size}.")
        model = getattr(ns, "model", None)
        if must_exist:
            existing = open_milvus_index(ns)
            model = model or existing.model.get("name_or_path")
            if not model:
                raise ValueError("the collection records no model: pass --model.")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            if not ns.milvus.startswith(SERVER_SCHEMES):
                raise ValueError(
                    f"--milvus {ns.milvus!r} is a Milvus Lite file, which one process at a time can open: under "
                    "accelerate launch, start `milvus-lite server --data-dir DIR --host 127.0.0.1 --port 19530` and "
                    "pass --milvus http://127.0.0.1:19530."
                )
            from accelerate import Accelerator

            accelerator = Accelerator()
        device = None if accelerator is not None else _device(ns)
        index, upserted = build_milvus_index(
            model, images, ns.milvus, ns.collection, token=token(ns),
            index_type=getattr(ns, "milvus_index", "HNSW"), accelerator=accelerator, batch_size=ns.batch_size,
            device=device, progress=ns.progress, num_workers=ns.num_workers, image_column=ns.image_column,
            label_column=ns.label_column, id_column=ns.id_column, backend=ns.backend,
            metadata_columns=getattr(ns, "metadata_columns", None),
        )  # fmt: skip
    except (ValueError, FileNotFoundError, ImportError) as error:
        return report_error(command, error)
    finally:
        if accelerator is not None:  # leave the process group: gloo's threads abort the interpreter at exit otherwise
            accelerator.end_training()
    if accelerator is None or accelerator.is_main_process:
        print(f"{index}: {len(index)} items after upserting {upserted} in this process")
    return 0


def _device(ns: argparse.Namespace) -> str:
    if ns.device is not None:
        return ns.device
    import torch

    return "cuda" if torch.cuda.is_available() and ns.backend == "torch" else "cpu"


def run_milvus_change(ns: argparse.Namespace, command: str, ids: list[str] | None = None) -> int:
    """``index remove`` (of ``ids``) and ``index info`` against the collection."""
    try:
        index = open_milvus_index(ns)
        if command == "index remove":
            removed = index.remove(ids)
            absent = len(set(ids)) - removed
            note = f" ({absent} ids were not in it)" if absent else ""
            print(f"removed {removed} items from {ns.collection}{note}; {len(index)} left")
            return 0
        info = index.info()
    except (ValueError, FileNotFoundError, ImportError) as error:
        return report_error(command, error)
    if getattr(ns, "json", False):
        print(json.dumps(info, ensure_ascii=False, default=str))
        return 0
    for key, value in info.items():
        shown = json.dumps(value, ensure_ascii=False, default=str) if isinstance(value, (dict, list)) else value
        print(f"{key}: {shown}")
    return 0
