"""The benchmark loaders on real fixtures in the official layouts (scaled down)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from _fixtures import make_cars, make_cub, make_inshop, make_sop
from datasets import ClassLabel
from PIL import Image

from crossmetric.data.benchmarks import (
    benchmark_name,
    load_benchmark,
    load_cars196,
    load_cub200,
    load_inshop,
    load_sop,
)
from crossmetric.data.dml_dataset import load_dml_dataset


def classes(split) -> set[int]:
    return set(np.unique(np.asarray(list(split["label"]))).tolist())


def test_cub200_folder_official_split(tmp_path):
    make_cub(tmp_path, n_classes=200, per_class=2)
    dd = load_cub200(tmp_path)  # the parent of CUB_200_2011/
    assert set(dd) == {"train", "test"}
    assert (len(dd["train"]), len(dd["test"])) == (200, 200)
    assert classes(dd["train"]) == set(range(100)) and classes(dd["test"]) == set(range(100, 200))
    label = dd["train"].features["label"]
    assert isinstance(label, ClassLabel) and label.num_classes == 200 and label.names[0] == "001.Bird_1"
    example = dd["test"][0]
    assert isinstance(example["image"], Image.Image) and example["label"] == 100
    # The folder itself works as data_dir too.
    assert len(load_cub200(tmp_path / "CUB_200_2011")["train"]) == 200


def test_cub200_from_tgz(tmp_path):
    archive = make_cub(tmp_path, n_classes=10, per_class=3, archive=True)
    assert not (tmp_path / "CUB_200_2011").exists()
    dd = load_cub200(tmp_path)
    assert (len(dd["train"]), len(dd["test"])) == (15, 15)
    assert classes(dd["train"]).isdisjoint(classes(dd["test"]))
    assert (tmp_path / "CUB_200_2011" / "images.txt").is_file() and archive.is_file()


def test_cars196_from_mat(tmp_path):
    make_cars(tmp_path, n_classes=196, per_class=2)
    dd = load_cars196(tmp_path)
    assert (len(dd["train"]), len(dd["test"])) == (196, 196)
    assert classes(dd["train"]) == set(range(98)) and classes(dd["test"]) == set(range(98, 196))
    assert dd["train"].features["label"].names[97] == "Make Model 98 2012"
    assert dd["train"][0]["image"].size == (8, 6)


def test_sop_files(tmp_path):
    make_sop(tmp_path, n_train=12, n_test=10, per_class=2)
    dd = load_sop(tmp_path)
    assert (len(dd["train"]), len(dd["test"])) == (24, 20)
    assert len(classes(dd["train"])) == 12 and len(classes(dd["test"])) == 10
    assert classes(dd["train"]).isdisjoint(classes(dd["test"]))
    assert set(dd["train"]["super_class_id"]) == {1, 2}


def test_inshop_partition(tmp_path):
    make_inshop(tmp_path, n_train=6, n_test=5, per_item=3)
    dd = load_inshop(tmp_path)
    assert set(dd) == {"train", "query", "gallery"}
    assert (len(dd["train"]), len(dd["query"]), len(dd["gallery"])) == (18, 5, 10)
    assert classes(dd["query"]) == classes(dd["gallery"])
    assert classes(dd["train"]).isdisjoint(classes(dd["query"]))
    assert dd["train"].features["label"].names[0] == "id_00000001"


def test_load_dml_dataset_dispatches_benchmarks(tmp_path):
    make_inshop(tmp_path, n_train=4, n_test=3, per_item=2)
    dd = load_dml_dataset("inshop", data_dir=tmp_path)
    assert list(dd) == ["train", "query", "gallery"]
    with pytest.raises(ValueError, match="data_dir"):
        load_dml_dataset("cub200")


@pytest.mark.parametrize(
    ("loader", "missing"),
    [
        (load_cub200, "images.txt"),
        (load_cars196, "cars_annos.mat"),
        (load_sop, "Ebay_train.txt"),
        (load_inshop, "list_eval_partition.txt"),
    ],
)
def test_missing_annotation_file_is_named(tmp_path, loader, missing):
    with pytest.raises(FileNotFoundError, match=missing) as info:
        loader(tmp_path)
    assert "Expected layout" in str(info.value)


def test_missing_image_is_named(tmp_path):
    base = make_cub(tmp_path, n_classes=4, per_class=2)
    (base / "images" / "003.Bird_3" / "Bird_3_0001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="Bird_3_0001.jpg"):
        load_cub200(tmp_path)


def test_benchmark_names():
    assert benchmark_name("CUB") == "cub200" and benchmark_name("In-Shop") == "inshop"
    assert benchmark_name("stanford_online_products") == "sop" and benchmark_name("mnist") is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_benchmark("cars196", "/nonexistent/cars")
