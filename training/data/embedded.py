"""The embedded "glyphs" benchmark: CJK characters (classes) drawn by many fonts (images).

The data ships inside the package (``training/data/glyphs_data/``: ``train.parquet``, ``test.parquet``,
``manifest.json``), so the default benchmark works offline and needs no Hub access. Train and test
hold disjoint halves of the characters, as deep-metric-learning protocols ask. The files are built by
``scripts/build_glyphs.py``; the manifest records their sha256 hashes and counts, which
:func:`verify_glyphs` checks so that a truncated or hand-edited file fails loudly instead of silently
shifting benchmark numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

GLYPHS_DIR = Path(__file__).resolve().parent / "glyphs_data"
SPLITS = ("train", "test")

_FIX = (
    "Restore the committed data with `git checkout -- training/data/glyphs_data` or rebuild it with "
    "`python scripts/build_glyphs.py` (see that script for the Debian font packages it needs)."
)


class GlyphsDataError(RuntimeError):
    """The glyph data files are missing or do not match their manifest."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(glyphs_dir: str | Path = GLYPHS_DIR) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a glyphs folder; raises :class:`GlyphsDataError` if unreadable."""
    path = Path(glyphs_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise GlyphsDataError(f"Cannot read the glyphs manifest {path}: {err}. {_FIX}") from err
    missing = [s for s in SPLITS if s not in manifest.get("splits", {})]
    if missing:
        raise GlyphsDataError(f"Glyphs manifest {path} lacks the split(s) {missing}. {_FIX}")
    return manifest


def verify_glyphs(glyphs_dir: str | Path = GLYPHS_DIR) -> dict[str, Any]:
    """Check that every split file exists and has the sha256 recorded in the manifest; return the manifest.

    Hashing the ~20 MB of parquet takes well under a second.
    """
    glyphs_dir = Path(glyphs_dir)
    manifest = read_manifest(glyphs_dir)
    for split in SPLITS:
        entry = manifest["splits"][split]
        path = glyphs_dir / entry["file"]
        if not path.is_file():
            raise GlyphsDataError(f"Glyphs {split} file {path} is missing. {_FIX}")
        digest = _sha256(path)
        if digest != entry["sha256"]:
            raise GlyphsDataError(
                f"Glyphs {split} file {path} has sha256 {digest}, but the manifest records {entry['sha256']}: "
                f"the file was changed or is incomplete (a Git LFS pointer?). {_FIX}"
            )
    return manifest


def load_glyphs(verify: bool = True, glyphs_dir: str | Path = GLYPHS_DIR):
    """Load the glyphs benchmark as a ``datasets.DatasetDict`` with splits ``"train"`` and ``"test"``.

    Columns: ``image`` (``datasets.Image``, 80x80 grayscale PIL images on access), ``label``
    (``datasets.ClassLabel`` shared by both splits; names like ``"U+8A9E 語"``; train and test use
    disjoint label ids) and ``font`` (the font that drew the image). Loads from the package files into
    memory without touching the ``datasets`` cache or the network.

    Args:
        verify: check the files' sha256 hashes and the row and class counts against ``manifest.json``
            (recommended; about half a second).
        glyphs_dir: folder holding the files (default: the copy inside the package).

    Raises:
        GlyphsDataError: a file is missing, or its hash or counts differ from the manifest.
    """
    import datasets  # heavy import, deferred so that importing this module stays cheap
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    glyphs_dir = Path(glyphs_dir)
    manifest = verify_glyphs(glyphs_dir) if verify else read_manifest(glyphs_dir)
    splits = {}
    for split in SPLITS:
        entry = manifest["splits"][split]
        path = glyphs_dir / entry["file"]
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) on bad files
            raise GlyphsDataError(f"Cannot read glyphs {split} file {path}: {err}. {_FIX}") from err
        # The features (Image, ClassLabel) come back from the parquet schema's "huggingface" metadata.
        ds = datasets.Dataset(InMemoryTable(table), split=datasets.NamedSplit(split))
        if verify:
            _check_counts(ds, entry, manifest, split, path)
        splits[split] = ds
    return datasets.DatasetDict(splits)


def _check_counts(ds, entry: dict[str, Any], manifest: dict[str, Any], split: str, path: Path) -> None:
    """Row count, class count, ClassLabel size and column types must match the manifest."""
    import datasets

    label = ds.features.get("label")
    if not isinstance(label, datasets.ClassLabel) or not isinstance(ds.features.get("image"), datasets.Image):
        raise GlyphsDataError(f"Glyphs {split} file {path} lacks the Image/ClassLabel features. {_FIX}")
    num_classes = len(ds.data.column("label").unique())  # arrow-side: no per-row Python objects
    problems = []
    if ds.num_rows != entry["num_rows"]:
        problems.append(f"{ds.num_rows} rows, manifest says {entry['num_rows']}")
    if num_classes != entry["num_classes"]:
        problems.append(f"{num_classes} classes, manifest says {entry['num_classes']}")
    if label.num_classes != manifest["num_classes"]:
        problems.append(f"ClassLabel has {label.num_classes} names, manifest says {manifest['num_classes']}")
    if problems:
        raise GlyphsDataError(f"Glyphs {split} file {path}: {'; '.join(problems)}. {_FIX}")
