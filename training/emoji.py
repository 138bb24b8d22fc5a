"""The embedded "emoji" development benchmark: emoji (classes) drawn by open-licensed designs (images).

A second small benchmark of another domain than the glyphs: ~800 emoji, each drawn by 4-10 of Noto,
Noto v1 (blob era), Twemoji, OpenMoji, Fluent flat and high-contrast, EmojiOne 1/2/monotone and Firefox OS,
80x80 RGB on white; train and test hold disjoint halves of the emoji. The files (``training/emoji/``:
``train.parquet``, ``test.parquet``, ``manifest.json`` with sha256 hashes, counts and each design's
license) are built by ``scripts/build_emoji.py``. Loading and verification reuse the glyphs functions,
which take the folder as an argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .glyphs import GlyphsDataError, load_glyphs, read_manifest, verify_glyphs

EMOJI_DIR = Path(__file__).resolve().parent / "emoji"

__all__ = ["EMOJI_DIR", "GlyphsDataError", "load_emoji", "read_emoji_manifest", "verify_emoji"]


_FIX = "`git checkout -- training/emoji`, or rebuild with `python scripts/build_emoji.py` (see that script)."


def read_emoji_manifest(emoji_dir: str | Path = EMOJI_DIR) -> dict[str, Any]:
    """The parsed ``manifest.json`` of the emoji folder."""
    return read_manifest(emoji_dir)


def verify_emoji(emoji_dir: str | Path = EMOJI_DIR) -> dict[str, Any]:
    """Check both split files against the sha256 hashes of the manifest; return the manifest."""
    return verify_glyphs(emoji_dir)


def load_emoji(verify: bool = True, emoji_dir: str | Path = EMOJI_DIR):
    """Load the emoji benchmark as a ``datasets.DatasetDict`` with splits ``"train"`` and ``"test"``.

    Columns: ``image`` (``datasets.Image``, 80x80 RGB PIL images on access), ``label``
    (``datasets.ClassLabel`` shared by both splits, names like ``"U+1F436 dog-face"``; train and test
    use disjoint label ids) and ``design`` (the emoji set that drew the image). Raises
    :class:`GlyphsDataError` (the glyphs loader's error) if a file is missing or differs from the manifest.
    """
    try:
        return load_glyphs(verify=verify, glyphs_dir=emoji_dir)
    except GlyphsDataError as err:  # its fix names the glyphs files: say what applies here
        raise GlyphsDataError(f"{err} (For the emoji data: {_FIX})") from err
