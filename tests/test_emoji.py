"""The embedded emoji development benchmark: integrity, counts vs manifest, class-disjoint splits, images
per class within bounds, decodable 80x80 RGB images, licenses recorded; load_dml_dataset("emoji")."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crossmetric.data.embedded import EMOJI_DIR, EmbeddedDataError, load_embedded, verify_embedded  # noqa: E402

MIN_PER_CLASS, MAX_PER_CLASS = 3, 10
OPEN_LICENSES = {"Apache-2.0", "MIT", "CC-BY-4.0", "CC-BY-SA-4.0"}


@pytest.fixture(scope="module")
def emoji():
    return load_embedded("emoji", verify=True)


@pytest.fixture(scope="module")
def manifest():
    return verify_embedded(EMOJI_DIR)


def _labels(ds) -> np.ndarray:
    return ds.data.column("label").to_numpy()


def test_counts_match_manifest_and_bounds(emoji, manifest):
    total_bytes = 0
    for split in ("train", "test"):
        entry = manifest["splits"][split]
        labels = _labels(emoji[split])
        counts = np.bincount(labels)[np.unique(labels)]
        assert len(labels) == entry["num_rows"]
        assert len(counts) == entry["num_classes"]
        assert {str(k): int((counts == k).sum()) for k in np.unique(counts)} == entry["images_per_class"]
        assert MIN_PER_CLASS <= counts.min() and counts.max() <= MAX_PER_CLASS
        designs = emoji[split].data.column("design").to_pylist()
        assert {d: designs.count(d) for d in entry["images_per_design"]} == entry["images_per_design"]
        total_bytes += (EMOJI_DIR / entry["file"]).stat().st_size
    assert emoji["train"].features["label"].num_classes == manifest["num_classes"]
    assert total_bytes < 10 * 2**20  # "a few MB"


def test_splits_are_class_disjoint_and_share_the_label_names(emoji):
    train, test = emoji["train"], emoji["test"]
    assert not set(_labels(train)) & set(_labels(test))
    assert train.features["label"].names == test.features["label"].names


def test_images_are_80px_rgb(emoji):
    test = emoji["test"]
    for i in range(0, len(test), max(1, len(test) // 25)):
        image = test[i]["image"]
        assert image.mode == "RGB" and image.size == (80, 80)


def test_every_design_has_an_open_license(manifest):
    used = set(manifest["splits"]["train"]["images_per_design"]) | set(manifest["splits"]["test"]["images_per_design"])
    licenses = {d["name"]: d["license"] for d in manifest["designs"]}
    assert used <= set(licenses)
    assert all(licenses[name] in OPEN_LICENSES for name in used)


def test_load_dml_dataset_emoji(emoji):
    from crossmetric.data.dml_dataset import load_dml_dataset

    dd = load_dml_dataset("emoji")
    assert set(dd) == {"train", "test"}
    assert dd["test"].num_rows == emoji["test"].num_rows


def test_tampered_file_fails_loudly(tmp_path: Path):
    folder = tmp_path / "emoji"
    shutil.copytree(EMOJI_DIR, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"]["test"]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EmbeddedDataError, match="emoji"):
        load_embedded("emoji", directory=folder)
