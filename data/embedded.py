"""The embedded benchmarks: data that ships inside the package, so the default jobs work offline without the Hub.

- ``glyphs`` (the main job): CJK characters (classes) drawn by many fonts (images), 80×80 grey, built by
  ``scripts/build_glyphs.py`` from Debian font packages.
- ``emoji`` (the second development benchmark, another domain): emoji (classes) drawn by 4-10 open-licensed designs
  (Noto, Twemoji, OpenMoji, Fluent, EmojiOne, Firefox OS; licenses in its manifest), 80×80 RGB on white, built by
  ``scripts/build_emoji.py`` from npm packages.

Each lives in ``data/<name>_data/`` (``train.parquet``, ``test.parquet``, ``manifest.json``). Train and test
hold disjoint halves of the classes, as deep-metric-learning protocols ask. The manifest records the files' sha256
hashes and counts, which :func:`verify_embedded` checks so that a truncated or hand-edited file fails loudly instead of
silently shifting benchmark numbers.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

DATA_ROOT = Path(__file__).resolve().parent
EMBEDDED = ("glyphs", "emoji")
GLYPHS_DIR = DATA_ROOT / "glyphs_data"
EMOJI_DIR = DATA_ROOT / "emoji_data"
SPLITS = ("train", "test")

_BUILD_HINTS = {
    "glyphs": "`python scripts/build_glyphs.py` (see that script for the Debian font packages it needs)",
    "emoji": "`python scripts/build_emoji.py` (see that script for the npm packages it needs)",
}


def _fix(directory: Path) -> str:
    name = directory.name.removesuffix("_data")
    hint = _BUILD_HINTS.get(name, "its build script in scripts/")
    return f"Restore the committed data with `git checkout -- data/{directory.name}` or rebuild it with {hint}."


class EmbeddedDataError(RuntimeError):
    """The files of an embedded benchmark are missing or do not match their manifest."""


GlyphsDataError = EmbeddedDataError  # the name of the first release


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: str | Path = GLYPHS_DIR) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a benchmark folder; raises :class:`EmbeddedDataError` if unreadable."""
    path = Path(directory) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise EmbeddedDataError(f"Cannot read the manifest {path}: {err}. {_fix(directory)}") from err
    missing = [s for s in SPLITS if s not in manifest.get("splits", {})]
    if missing:
        raise EmbeddedDataError(f"Manifest {path} lacks the split(s) {missing}. {_fix(directory)}")
    return manifest


def verify_embedded(directory: str | Path = GLYPHS_DIR) -> dict[str, Any]:
    """Check that every split file exists and has the sha256 recorded in the manifest; return the manifest.

    Hashing the ~20 MB of parquet takes well under a second.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    for split in SPLITS:
        entry = manifest["splits"][split]
        path = directory / entry["file"]
        if not path.is_file():
            raise EmbeddedDataError(f"{directory.name} {split} file {path} is missing. {_fix(directory)}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise EmbeddedDataError(
                f"{directory.name} {split} file {path} has sha256 {digest}, but the manifest records "
                f"{entry['sha256']}: "
                f"the file was changed or is incomplete (a Git LFS pointer?). {_fix(directory)}"
            )
    return manifest


def load_embedded(name: str = "glyphs", verify: bool = True, directory: str | Path | None = None):
    """Load an embedded benchmark as a ``datasets.DatasetDict`` with splits ``"train"`` and ``"test"``.

    Columns: ``image`` (``datasets.Image``, 80x80 PIL images on access), ``label`` (``datasets.ClassLabel`` shared
    by both splits, e.g. ``"U+8A9E 語"`` or ``"U+1F436 dog-face"``; train and test use disjoint label ids) and the
    source that drew the image (``font`` for glyphs, ``design`` for emoji). Loads from the package files into memory
    without touching the ``datasets`` cache or the network.

    Args:
        name: ``"glyphs"`` or ``"emoji"``.
        verify: check the files' sha256 hashes and the row and class counts against ``manifest.json``
            (recommended; about half a second).
        directory: folder holding the files (default: the copy inside the package).

    Raises:
        EmbeddedDataError: a file is missing, or its hash or counts differ from the manifest.
    """
    import datasets  # heavy import, deferred so that importing this module stays cheap
    import pyarrow.parquet as pq
    from datasets.table import InMemoryTable

    if name not in EMBEDDED:
        raise ValueError(f"no embedded benchmark {name!r}; choose one of {EMBEDDED}.")
    directory = Path(directory) if directory is not None else DATA_ROOT / f"{name}_data"
    manifest = verify_embedded(directory) if verify else read_manifest(directory)
    splits = {}
    for split in SPLITS:
        entry = manifest["splits"][split]
        path = directory / entry["file"]
        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) on bad files
            raise EmbeddedDataError(
                f"Cannot read {directory.name} {split} file {path}: {err}. {_fix(directory)}"
            ) from err
        # The features (Image, ClassLabel) come back from the parquet schema's "huggingface" metadata.
        ds = datasets.Dataset(InMemoryTable(table), split=datasets.NamedSplit(split))
        if verify:
            _check_counts(ds, entry, manifest, split, path, directory)
        splits[split] = ds
    return datasets.DatasetDict(splits)


def _check_counts(
    ds: Any, entry: dict[str, Any], manifest: dict[str, Any], split: str, path: Path, directory: Path
) -> None:
    """Row count, class count, ClassLabel size and column types must match the manifest."""
    import datasets

    label = ds.features.get("label")
    if not isinstance(label, datasets.ClassLabel) or not isinstance(ds.features.get("image"), datasets.Image):
        raise EmbeddedDataError(
            f"{directory.name} {split} file {path} lacks the Image/ClassLabel features. {_fix(directory)}"
        )
    num_classes = len(ds.data.column("label").unique())  # arrow-side: no per-row Python objects
    problems = []
    if ds.num_rows != entry["num_rows"]:
        problems.append(f"{ds.num_rows} rows, manifest says {entry['num_rows']}")
    if num_classes != entry["num_classes"]:
        problems.append(f"{num_classes} classes, manifest says {entry['num_classes']}")
    if label.num_classes != manifest["num_classes"]:
        problems.append(f"ClassLabel has {label.num_classes} names, manifest says {manifest['num_classes']}")
    if problems:
        raise EmbeddedDataError(f"{directory.name} {split} file {path}: {'; '.join(problems)}. {_fix(directory)}")


def load_glyphs(verify: bool = True, glyphs_dir: str | Path = GLYPHS_DIR):
    """The glyph benchmark (see :func:`load_embedded`)."""
    return load_embedded("glyphs", verify=verify, directory=glyphs_dir)


verify_glyphs = verify_embedded
