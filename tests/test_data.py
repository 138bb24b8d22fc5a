"""load_dml_dataset: every kind of input, class-disjoint splits, labels, and clear errors."""

from __future__ import annotations

import logging
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from _fixtures import jpeg_bytes, make_image_folder
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image

from crossmetric import load_dml_dataset
from crossmetric.data.dml_dataset import describe_dataset, resolve_dataset_name


def classes(split) -> set[int]:
    return set(np.unique(np.asarray(list(split["label"]))).tolist())


def class_names(split) -> set[str]:
    return set(split.features["label"].int2str(sorted(classes(split))))


def pil(index: int) -> Image.Image:
    return Image.new("RGB", (5, 5), (index * 20 % 256, 0, 0))


def test_image_folder_is_split_by_sorted_classes(tmp_path):
    names = [f"class_{i:02d}" for i in range(6)]
    make_image_folder(tmp_path / "photos", names, per_class=3)
    dd = load_dml_dataset(str(tmp_path / "photos"))
    assert list(dd) == ["train", "test"]
    assert class_names(dd["train"]) == set(names[:3]) and class_names(dd["test"]) == set(names[3:])
    assert len(dd["train"]) == len(dd["test"]) == 9
    assert isinstance(dd["train"].features["label"], ClassLabel)
    assert dd["test"][0]["image"].size == (8, 6)


def test_image_folder_with_official_train_test(tmp_path):
    make_image_folder(tmp_path / "set" / "train", ["a", "b", "c"], per_class=2)
    make_image_folder(tmp_path / "set" / "test", ["d", "e"], per_class=2)
    dd = load_dml_dataset(tmp_path / "set")
    assert class_names(dd["train"]) == {"a", "b", "c"} and class_names(dd["test"]) == {"d", "e"}
    # Re-splitting by sorted class order ignores the folders' split.
    resplit = load_dml_dataset(tmp_path / "set", split_strategy="sorted")
    assert class_names(resplit["train"]) == {"a", "b", "c"} and len(resplit["test"]) == 4


def test_official_split_that_shares_classes_is_refused(tmp_path):
    make_image_folder(tmp_path / "set" / "train", ["a", "b", "c"], per_class=2)
    make_image_folder(tmp_path / "set" / "test", ["c", "d"], per_class=2)
    with pytest.raises(ValueError, match=r"share 1 classes \(e.g. \['c'\]\).*split_strategy='sorted'"):
        load_dml_dataset(tmp_path / "set")
    dd = load_dml_dataset(tmp_path / "set", split_strategy="shuffle", seed=0)
    assert classes(dd["train"]).isdisjoint(classes(dd["test"]))


def test_dataset_object_with_string_labels_and_other_column_names():
    species = ["wren", "auk", "tern", "owl", "kite", "rail"]
    ds = Dataset.from_dict(
        {
            "img": [pil(c) for c in range(6) for _ in range(2)],
            "species": [s for s in species for _ in range(2)],
            "image": ["x"] * 12,
        }
    )
    dd = load_dml_dataset(ds, image_column="img", label_column="species")
    assert set(dd["train"].column_names) == {"image", "label"}
    assert dd["train"].features["label"].names == sorted(species)
    assert class_names(dd["train"]) == {"auk", "kite", "owl"}
    assert isinstance(dd["train"][0]["image"], Image.Image)


def test_integer_labels_sort_numerically_and_shuffle_is_seeded():
    labels = [c for c in (5, 10, 40, 20, 30, 100) for _ in range(2)]
    ds = Dataset.from_dict({"image": [pil(i) for i in range(12)], "label": labels})
    dd = load_dml_dataset(ds)
    assert dd["train"].features["label"].names == ["5", "10", "20", "30", "40", "100"]
    assert class_names(dd["train"]) == {"5", "10", "20"}
    shuffled = [class_names(load_dml_dataset(ds, split_strategy="shuffle", seed=s)["train"]) for s in range(6)]
    assert shuffled[0] == class_names(load_dml_dataset(ds, split_strategy="shuffle", seed=0)["train"])
    assert len({frozenset(s) for s in shuffled}) > 1


def test_validation_split_is_carved_from_train_classes():
    ds = Dataset.from_dict({"image": [pil(i) for i in range(40)], "label": [c for c in range(20) for _ in range(2)]})
    plain = load_dml_dataset(ds)
    dd = load_dml_dataset(ds, validation_fraction=0.2, seed=3)
    assert list(dd) == ["train", "test", "validation"]
    assert len(classes(dd["validation"])) == 2 and len(classes(dd["train"])) == 8
    assert classes(dd["train"]) | classes(dd["validation"]) == classes(plain["train"])
    assert classes(dd["test"]) == classes(plain["test"])
    sets = [classes(dd[s]) for s in dd]
    assert all(a.isdisjoint(b) for i, a in enumerate(sets) for b in sets[i + 1 :])


def test_saved_dataset_and_dataset_dict(tmp_path):
    ds = Dataset.from_dict(
        {"image": [pil(i) for i in range(8)], "label": [0, 0, 1, 1, 2, 2, 3, 3]},
        features=Features({"image": ImageFeature(), "label": ClassLabel(names=list("abcd"))}),
    )
    ds.save_to_disk(tmp_path / "single")
    assert len(load_dml_dataset(tmp_path / "single")["test"]) == 4
    DatasetDict(train=ds.select(range(4)), test=ds.select(range(4, 8))).save_to_disk(tmp_path / "both")
    dd = load_dml_dataset(str(tmp_path / "both"))
    assert class_names(dd["test"]) == {"c", "d"}


def test_image_paths_as_strings_are_cast_to_images(tmp_path):
    paths = []
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(i))
        paths.append(str(tmp_path / f"{i}.jpg"))
    dd = load_dml_dataset(Dataset.from_dict({"path": paths, "label": [0, 0, 1, 1, 2, 2]}), image_column="path")
    assert dd["train"][0]["image"].size == (8, 6)


def test_missing_column_names_it_and_the_available_ones():
    ds = Dataset.from_dict({"picture": [pil(0)] * 4, "label": [0, 0, 1, 1]})
    with pytest.raises(ValueError, match=r"no image column 'image'.*\['picture', 'label'\].*image_column"):
        load_dml_dataset(ds)
    with pytest.raises(ValueError, match=r"no label column 'cls'"):
        load_dml_dataset(ds, image_column="picture", label_column="cls")


def test_degenerate_datasets_raise_or_warn(caplog):
    with pytest.raises(ValueError, match="1 class"):
        load_dml_dataset(Dataset.from_dict({"image": [pil(0)] * 4, "label": [7] * 4}))
    singletons = Dataset.from_dict({"image": [pil(i) for i in range(6)], "label": list(range(6))})
    with pytest.raises(ValueError, match="fewer than 2 images.*no positive pairs"):
        load_dml_dataset(singletons)
    # Test classes with a single image are allowed but reported.
    labels = [0, 0, 1, 1, 2, 2, 3, 4, 5, 5]
    with caplog.at_level(logging.WARNING):
        dd = load_dml_dataset(Dataset.from_dict({"image": [pil(i) for i in range(10)], "label": labels}))
    assert len(dd["test"]) == 4 and "2 of 3 classes in split 'test' have only 1 image" in caplog.text


def test_glyphs_are_loaded_lazily(monkeypatch):
    ds = Dataset.from_dict({"image": [pil(i) for i in range(8)], "label": [0, 0, 1, 1, 2, 2, 3, 3]})
    fake = types.ModuleType("crossmetric.data.embedded")
    fake.load_embedded = lambda name: DatasetDict(train=ds.select(range(4)), test=ds.select(range(4, 8)))
    monkeypatch.setitem(sys.modules, "crossmetric.data.embedded", fake)
    dd = load_dml_dataset("glyphs")
    assert (len(dd["train"]), len(dd["test"])) == (4, 4)


def test_resolve_dataset_name_and_offline_hub(tmp_path, monkeypatch):
    (tmp_path / "folder").mkdir()
    assert resolve_dataset_name("glyphs") == ("glyphs", "glyphs")
    assert resolve_dataset_name("CUB200") == ("benchmark", "cub200")
    assert resolve_dataset_name(tmp_path / "folder") == ("folder", str(tmp_path / "folder"))
    assert resolve_dataset_name("someone/birds") == ("hub", "someone/birds")
    with pytest.raises(ValueError, match="no such folder"):
        resolve_dataset_name("/definitely/not/here")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="Hub is offline"):
        load_dml_dataset("someone/birds")
    with pytest.raises(ValueError, match="split_strategy"):
        load_dml_dataset("glyphs", split_strategy="random")


def test_describe_dataset():
    ds = Dataset.from_dict({"image": [pil(i) for i in range(9)], "label": [0, 0, 1, 1, 1, 2, 2, 3, 3]})
    text = describe_dataset(load_dml_dataset(ds))
    assert text.splitlines() == [
        "train: 5 images, 2 classes (images per class min 2, median 2.5, max 3)",
        "test: 4 images, 2 classes (images per class min 2, median 2, max 2)",
    ]
