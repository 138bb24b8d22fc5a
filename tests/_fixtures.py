"""Small on-disk copies of the DML benchmark layouts and of image folders, built for real.

Each builder writes real files in the official layout (real JPEGs, a real .mat written by scipy in
the structure of Cars196's cars_annos.mat, a real .tgz for CUB) so that the loaders are tested on
the same parsing path as the full datasets, only with fewer images.
"""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg_bytes(index: int, size: tuple[int, int] = (8, 6)) -> bytes:
    """A tiny JPEG whose colour depends on ``index``."""
    colour = ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_image_folder(root: Path, classes: list[str], per_class: int | list[int], ext: str = "jpg") -> Path:
    """``root/<class>/<n>.<ext>``: one sub-folder per class (``per_class`` may differ per class)."""
    counts = per_class if isinstance(per_class, list) else [per_class] * len(classes)
    for c, (name, count) in enumerate(zip(classes, counts)):
        for i in range(count):
            _write(root / name / f"{i}.{ext}", jpeg_bytes(c))
    return root


def make_cub(root: Path, n_classes: int = 200, per_class: int = 2, archive: bool = False) -> Path:
    """``root/CUB_200_2011/`` (or ``root/CUB_200_2011.tgz`` when ``archive``) in the official layout."""
    base = root / "CUB_200_2011"
    images, labels, classes = [], [], []
    image_id = 0
    for c in range(1, n_classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {folder}")
        data = jpeg_bytes(c)
        for i in range(per_class):
            image_id += 1
            relative = f"{folder}/Bird_{c}_{i:04d}.jpg"
            _write(base / "images" / relative, data)
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "classes.txt").write_text("\n".join(classes) + "\n")
    if archive:
        with tarfile.open(root / "CUB_200_2011.tgz", "w:gz") as tar:
            tar.add(base, arcname="CUB_200_2011")
        shutil.rmtree(base)
        return root / "CUB_200_2011.tgz"
    return base


def make_cars(root: Path, n_classes: int = 196, per_class: int = 2) -> Path:
    """``root/cars_annos.mat`` + ``root/car_ims/``; the .mat has cars_annos.mat's struct array and names."""
    from scipy.io import savemat

    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    n = n_classes * per_class
    annotations = np.zeros((1, n), dtype=[(f, "O") for f in fields])
    for k in range(n):
        c = k // per_class + 1
        relative = f"car_ims/{k + 1:06d}.jpg"
        _write(root / relative, jpeg_bytes(c))
        annotations[0, k] = (relative, 1, 2, 7, 5, c, k % 2)  # the official test flag: ignored for DML
    names = np.array([f"Make Model {c} 2012" for c in range(1, n_classes + 1)], dtype=object).reshape(1, -1)
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": names})
    return root


def make_sop(root: Path, n_train: int = 12, n_test: int = 10, per_class: int = 2) -> Path:
    """``root/Stanford_Online_Products/`` with Ebay_train.txt / Ebay_test.txt and image folders."""
    base = root / "Stanford_Online_Products"
    supers = ["bicycle_final", "chair_final"]
    image_id = 0
    for split, first, count in (("train", 1, n_train), ("test", n_train + 1, n_test)):
        lines = ["image_id class_id super_class_id path"]
        for c in range(first, first + count):
            s = c % 2
            for i in range(per_class):
                image_id += 1
                relative = f"{supers[s]}/{1000 + c}_{i}.JPG"
                _write(base / relative, jpeg_bytes(c))
                lines.append(f"{image_id} {c} {s + 1} {relative}")
        (base / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return base


def make_inshop(root: Path, n_train: int = 6, n_test: int = 5, per_item: int = 3) -> Path:
    """``root/Eval/list_eval_partition.txt`` + ``root/Img/img/...`` (test items: 1 query, rest gallery)."""
    rows = []
    for item in range(1, n_train + n_test + 1):
        item_id = f"id_{item:08d}"
        for i in range(per_item):
            relative = f"img/WOMEN/Dresses/{item_id}/{i:02d}_1_front.jpg"
            _write(root / "Img" / relative, jpeg_bytes(item))
            status = "train" if item <= n_train else ("query" if i == 0 else "gallery")
            rows.append(f"{relative}  {item_id}  {status}")
    header = [str(len(rows)), "image_name item_id evaluation_status"]
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    (root / "Eval" / "list_eval_partition.txt").write_text("\n".join(header + rows) + "\n")
    return root
