"""What ``build_glyphs.py`` and ``build_emoji.py`` share: a private staging folder next to the benchmark folder,
a split written as parquet with its manifest entry, and the finished folder swapped in with its manifest."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crossmetric.data.embedded import sha256_file


def base_parser(doc: str, out: Path, num_classes: int, num_classes_help: str, packages: str) -> argparse.ArgumentParser:
    """The options both builds take: ``--out``, ``--num-classes``, ``--seed`` and ``--print-packages``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=out, help="output folder (replaced as a whole)")
    parser.add_argument("--num-classes", type=int, default=num_classes, help=num_classes_help)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-packages", action="store_true", help=f"print the {packages} to install; exit")
    return parser


def split_summary(manifest: dict) -> dict:
    """The manifest's split entries without their hashes, to print at the end of a build."""
    return {split: {k: v for k, v in entry.items() if k != "sha256"} for split, entry in manifest["splits"].items()}


@contextmanager
def staging_folder(out_dir: Path, prefix: str) -> Iterator[Path]:
    """A new folder beside ``out_dir`` (same file system, so the swap is a rename), removed when left."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the data folder is meant to be shared
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_split(folder: Path, split: str, rows: dict[str, list], features: Any, *, size: bool = False) -> dict:
    """Write ``rows`` to ``folder/SPLIT.parquet``; return its manifest entry (file, sha256, [bytes], num_rows)."""
    import datasets

    path = folder / f"{split}.parquet"
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    entry: dict[str, Any] = {"file": path.name, "sha256": sha256_file(path)}
    if size:
        entry["bytes"] = path.stat().st_size
    entry["num_rows"] = len(rows["label"])
    return entry


def publish(staging: Path, out_dir: Path, manifest: dict) -> None:
    """Write ``manifest.json`` into ``staging`` and swap it in as ``out_dir``: readers see either the old complete
    set or the new one."""
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    backup = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(out_dir, backup)
    os.replace(staging, out_dir)
    shutil.rmtree(backup, ignore_errors=True)
