"""The embedded glyphs benchmark: integrity, counts, class-disjoint splits, decodable images; the build
script's determinism where the Debian fonts are installed."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crossmetric.data.embedded import GLYPHS_DIR, GlyphsDataError, load_glyphs, verify_glyphs  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def glyphs():
    return load_glyphs(verify=True)


@pytest.fixture(scope="module")
def manifest():
    return verify_glyphs()


def _labels(ds) -> np.ndarray:
    """The label column via arrow (fast; iterating a datasets Column formats row by row)."""
    return ds.data.column("label").to_numpy()


def test_manifest_counts_match_data(glyphs, manifest):
    total_bytes = 0
    for split in ("train", "test"):
        entry = manifest["splits"][split]
        assert glyphs[split].num_rows == entry["num_rows"]
        assert len(set(_labels(glyphs[split]))) == entry["num_classes"]
        total_bytes += (GLYPHS_DIR / entry["file"]).stat().st_size
    assert manifest["num_classes"] >= 500
    assert (
        manifest["splits"]["train"]["num_classes"] + manifest["splits"]["test"]["num_classes"]
        == manifest["num_classes"]
    )
    assert total_bytes <= 30 * 2**20


def test_splits_are_class_disjoint_and_share_label_names(glyphs, manifest):
    train, test = set(_labels(glyphs["train"])), set(_labels(glyphs["test"]))
    assert not train & test
    assert train | test == set(range(manifest["num_classes"]))
    assert glyphs["train"].features["label"].names == glyphs["test"].features["label"].names


def test_every_class_has_at_least_15_distinct_fonts(glyphs):
    for split in ("train", "test"):
        labels = _labels(glyphs[split])
        fonts = glyphs[split].data.column("font").to_pylist()
        per_class: dict[int, set[str]] = {}
        for label, font in zip(labels, fonts):
            per_class.setdefault(int(label), set()).add(font)
        counts = np.bincount(labels)[sorted(per_class)]
        assert counts.min() >= 15
        # one image per (character, font): no font drew a class twice
        assert [len(per_class[c]) for c in sorted(per_class)] == counts.tolist()


def test_class_names_are_codepoint_and_character(glyphs):
    for name in glyphs["train"].features["label"].names:
        code, char = name.split(" ")
        assert code == f"U+{ord(char):04X}"
        assert 0x4E00 <= ord(char) <= 0x9FFF


def test_images_decode_to_stored_size(glyphs, manifest):
    size = manifest["image_size"]
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        ds = glyphs[split]
        for i in rng.choice(ds.num_rows, size=100, replace=False):
            img = ds[int(i)]["image"]
            assert img.size == (size, size) and img.mode == "L"
            pixels = np.asarray(img)
            assert pixels[0, 0] == 255 and pixels[-1, -1] == 255  # white margin
            assert pixels.min() < 128  # some black ink


def _copy_data(tmp_path: Path) -> Path:
    target = tmp_path / "glyphs"
    shutil.copytree(GLYPHS_DIR, target)
    return target


def test_changed_file_fails_with_rebuild_hint(tmp_path):
    folder = _copy_data(tmp_path)
    path = folder / "test.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(GlyphsDataError, match="sha256.*build_glyphs.py"):
        load_glyphs(glyphs_dir=folder)
    (folder / "train.parquet").unlink()
    with pytest.raises(GlyphsDataError, match="missing.*git checkout"):
        verify_glyphs(folder)


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_glyphs", REPO_ROOT / "scripts" / "build_glyphs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_candidate_characters_are_the_common_ideographs():
    build = _load_build_script()
    chars = build.candidate_characters()
    assert len(chars) == 3142 and chars == sorted(chars)
    assert {"人", "山", "土", "士", "雪", "雷"} <= set(chars)
    assert "国" not in chars and "國" not in chars  # not in Big5 / not in GB 2312
    assert build.class_name("語") == "U+8A9E 語"


def _faces_or_skip(build, count: int):
    faces = build.FONT_FACES[:count]
    if not all((build.FONT_ROOT / f.path).is_file() for f in faces):
        pytest.skip("Debian CJK fonts not installed (see scripts/build_glyphs.py)")
    return faces


def test_look_alikes_come_first():
    build = _load_build_script()
    chars = ["人", "土", "山", "士", "水", "未", "末"]
    reference = build.LoadedFace(_faces_or_skip(build, build.REFERENCE_FACE + 1)[build.REFERENCE_FACE], chars)
    order = build.confusable_order(chars, reference)
    assert set(order[:4]) == {"土", "士", "未", "末"} and sorted(order) == sorted(chars)


def test_build_is_deterministic_and_loadable(tmp_path, monkeypatch):
    build = _load_build_script()
    faces = _faces_or_skip(build, 8)
    monkeypatch.setattr(build, "FONT_FACES", faces)
    hashes = []
    for run in ("a", "b"):
        out = tmp_path / run / "glyphs"
        args = ["--out", str(out), "--num-classes", "4", "--fonts-per-class", "6", "--min-fonts", "6"]
        build.main([*args, "--select", "random"])  # "confusable" would render all 3142 characters first
        manifest = verify_glyphs(out)
        hashes.append([manifest["splits"][s]["sha256"] for s in ("train", "test")])
        assert not list(out.parent.glob(".glyphs-build-*"))  # temporary folder cleaned up
    assert hashes[0] == hashes[1]
    data = load_glyphs(glyphs_dir=out)
    assert data["train"].num_rows == data["test"].num_rows == 2 * 6
    assert data["train"].features["label"].num_classes == 4
