"""The four standard DML benchmarks, read from local copies of their official archives or folders.

None of them can be downloaded here, so each loader takes ``data_dir`` (the folder holding the
official archive or its extracted contents, or that folder itself) and builds a
``datasets.DatasetDict`` with images as file paths (``datasets.Image()``, decoded lazily) and a
``ClassLabel`` over all classes. Splits follow the usual class-disjoint DML protocol
(Oh Song et al. 2016):

- CUB-200-2011: classes 1-100 train, 101-200 test (5,864 / 5,924 images).
- Cars196: classes 1-98 train, 99-196 test (8,054 / 8,131 images); the .mat ``test`` flag is ignored.
- Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt`` (11,318 / 11,316 classes).
- In-Shop Clothes: ``list_eval_partition.txt`` train / query / gallery (3,997 train items; query and
  gallery share 3,985 items).
"""

from __future__ import annotations

import logging
import os
import tarfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CUB_LAYOUT = (
    "CUB_200_2011.tgz, or its extracted folder CUB_200_2011/ with images.txt, image_class_labels.txt, "
    "classes.txt and images/"
)
CARS_LAYOUT = "cars_annos.mat and car_ims/ (or car_ims.tgz) side by side"
SOP_LAYOUT = (
    "Stanford_Online_Products/ (or Stanford_Online_Products.zip) with Ebay_train.txt, Ebay_test.txt and "
    "the image folders they list"
)
INSHOP_LAYOUT = (
    "list_eval_partition.txt (in the folder or its Eval/ subfolder) and img/ (in the folder or its Img/ "
    "subfolder, or Img/img.zip)"
)


def _extract(archive: Path, destination: Path) -> None:
    """Unpack a .tgz/.tar/.zip archive into ``destination`` with a progress bar."""
    logger.info("Extracting %s into %s", archive, destination)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            for member in tqdm(zipped.infolist(), desc=f"Extracting {archive.name}", unit="file"):
                zipped.extract(member, destination)
        return
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        for member in tqdm(members, desc=f"Extracting {archive.name}", unit="file"):
            tar.extract(member, destination, filter="data")  # "data" refuses paths escaping destination


def _find_root(data_dir: str | os.PathLike, marker: str, folder: str, archive: str | None, layout: str) -> Path:
    """The folder that holds ``marker``: ``data_dir``, ``data_dir/folder``, or ``archive`` extracted.

    ``data_dir`` may also be the archive itself.
    """
    base = Path(data_dir).expanduser()
    if base.is_file() and archive and base.name == archive:
        _extract(base, base.parent)
        base = base.parent
    for candidate in (base, base / folder):
        if (candidate / marker).is_file():
            return candidate
    if archive and (base / archive).is_file():
        _extract(base / archive, base)
        if (base / folder / marker).is_file():
            return base / folder
    raise FileNotFoundError(
        f"{marker} not found under {base} (looked in {base} and {base / folder}). Expected layout: {layout}."
    )


def _check_images(root: Path, relative_paths: Sequence[str], layout: str) -> list[str]:
    """Absolute image paths; a clear error listing the first missing files if any is absent."""
    paths = [str(root / p) for p in relative_paths]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in the annotation files are missing, e.g. "
            f"{missing[:3]}. Expected layout: {layout}."
        )
    return paths


def _split(paths: list[str], labels: list[int], names: list[str], extra: dict | None = None) -> Dataset:
    """A split with lazily decoded image paths and a ClassLabel over all of the benchmark's classes."""
    features = {"image": Image(), "label": ClassLabel(names=names)}
    columns = {"image": paths, "label": labels}
    for key, values in (extra or {}).items():
        features[key] = Value("int64")
        columns[key] = values
    return Dataset.from_dict(columns, features=Features(features))


def _read_rows(path: Path, skip: int = 0) -> list[list[str]]:
    with open(path, encoding="utf-8") as file:
        lines = file.read().splitlines()[skip:]
    return [line.split() for line in lines if line.strip()]


def load_cub200(data_dir: str | os.PathLike) -> DatasetDict:
    """CUB-200-2011 from ``CUB_200_2011.tgz`` or its extracted folder: classes 1-100 train, 101-200 test."""
    root = _find_root(data_dir, "images.txt", "CUB_200_2011", "CUB_200_2011.tgz", CUB_LAYOUT)
    for name in ("image_class_labels.txt", "classes.txt"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} is missing. Expected layout: {CUB_LAYOUT}.")
    images = dict(_read_rows(root / "images.txt"))
    class_of = {image_id: int(class_id) for image_id, class_id in _read_rows(root / "image_class_labels.txt")}
    classes = sorted((int(i), name) for i, name in _read_rows(root / "classes.txt"))
    names = [name for _, name in classes]
    image_ids = sorted(images, key=int)
    paths = _check_images(root / "images", [images[i] for i in image_ids], CUB_LAYOUT)
    labels = [class_of[i] - 1 for i in image_ids]
    half = len(names) // 2  # 100 of 200
    return _by_class_id(paths, labels, names, half)


def _by_class_id(paths: list[str], labels: list[int], names: list[str], n_train: int) -> DatasetDict:
    train = [i for i, label in enumerate(labels) if label < n_train]
    test = [i for i, label in enumerate(labels) if label >= n_train]
    return DatasetDict(
        train=_split([paths[i] for i in train], [labels[i] for i in train], names),
        test=_split([paths[i] for i in test], [labels[i] for i in test], names),
    )


def load_cars196(data_dir: str | os.PathLike) -> DatasetDict:
    """Cars196 from ``cars_annos.mat`` + ``car_ims/``: classes 1-98 train, 99-196 test."""
    import numpy as np
    from scipy.io import loadmat

    root = _find_root(data_dir, "cars_annos.mat", "stanford_cars", None, CARS_LAYOUT)
    if not (root / "car_ims").is_dir():
        if (root / "car_ims.tgz").is_file():
            _extract(root / "car_ims.tgz", root)
        else:
            raise FileNotFoundError(f"{root / 'car_ims'} is missing. Expected layout: {CARS_LAYOUT}.")
    mat = loadmat(root / "cars_annos.mat", squeeze_me=True)
    if "annotations" not in mat or "class_names" not in mat:
        raise ValueError(
            f"{root / 'cars_annos.mat'} lacks 'annotations' or 'class_names' (has {sorted(mat)}); "
            "is it the Cars196 cars_annos.mat?"
        )
    annotations = np.atleast_1d(mat["annotations"])
    names = [str(n) for n in np.atleast_1d(mat["class_names"])]
    relative = [str(p) for p in annotations["relative_im_path"]]
    labels = [int(c) - 1 for c in annotations["class"]]
    paths = _check_images(root, relative, CARS_LAYOUT)
    return _by_class_id(paths, labels, names, len(names) // 2)  # 98 of 196


def load_sop(data_dir: str | os.PathLike) -> DatasetDict:
    """Stanford Online Products from ``Ebay_train.txt`` / ``Ebay_test.txt`` (class-disjoint by design)."""
    root = _find_root(
        data_dir, "Ebay_train.txt", "Stanford_Online_Products", "Stanford_Online_Products.zip", SOP_LAYOUT
    )
    if not (root / "Ebay_test.txt").is_file():
        raise FileNotFoundError(f"{root / 'Ebay_test.txt'} is missing. Expected layout: {SOP_LAYOUT}.")
    splits = {}
    for split, file in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        rows = _read_rows(root / file, skip=1)  # header: image_id class_id super_class_id path
        if any(len(row) != 4 for row in rows):
            raise ValueError(f"{root / file}: expected 4 columns 'image_id class_id super_class_id path' per line.")
        splits[split] = rows
    n_classes = max(int(row[1]) for rows in splits.values() for row in rows)
    names = [str(i) for i in range(1, n_classes + 1)]
    return DatasetDict(
        {
            split: _split(
                _check_images(root, [row[3] for row in rows], SOP_LAYOUT),
                [int(row[1]) - 1 for row in rows],
                names,
                {"super_class_id": [int(row[2]) for row in rows]},
            )
            for split, rows in splits.items()
        }
    )


def load_inshop(data_dir: str | os.PathLike) -> DatasetDict:
    """In-Shop Clothes Retrieval from ``list_eval_partition.txt``: splits train, query and gallery."""
    base = Path(data_dir).expanduser()
    if (base / "In-shop Clothes Retrieval Benchmark").is_dir():
        base = base / "In-shop Clothes Retrieval Benchmark"
    partition = next(
        (p for p in (base / "list_eval_partition.txt", base / "Eval" / "list_eval_partition.txt") if p.is_file()), None
    )
    if partition is None:
        raise FileNotFoundError(f"list_eval_partition.txt not found under {base}. Expected layout: {INSHOP_LAYOUT}.")
    image_root = next((p for p in (base, base / "Img") if (p / "img").is_dir()), None)
    if image_root is None and (base / "Img" / "img.zip").is_file():
        _extract(base / "Img" / "img.zip", base / "Img")
        image_root = base / "Img"
    if image_root is None:
        raise FileNotFoundError(f"img/ not found in {base} or {base / 'Img'}. Expected layout: {INSHOP_LAYOUT}.")
    # Line 1: number of images; line 2: header "image_name item_id evaluation_status".
    rows = _read_rows(partition, skip=2)
    if any(len(row) != 3 or row[2] not in ("train", "query", "gallery") for row in rows):
        raise ValueError(f"{partition}: expected lines 'image_name item_id train|query|gallery' after 2 header lines.")
    names = sorted({row[1] for row in rows})
    index = {name: i for i, name in enumerate(names)}
    result = {}
    for split in ("train", "query", "gallery"):
        chosen = [row for row in rows if row[2] == split]
        paths = _check_images(image_root, [row[0] for row in chosen], INSHOP_LAYOUT)
        result[split] = _split(paths, [index[row[1]] for row in chosen], names)
    return DatasetDict(result)


BENCHMARKS: dict[str, Callable[[str | os.PathLike], DatasetDict]] = {
    "cub200": load_cub200,
    "cars196": load_cars196,
    "sop": load_sop,
    "inshop": load_inshop,
}
_ALIASES = {
    "cub": "cub200",
    "cub-200": "cub200",
    "cub_200_2011": "cub200",
    "cub-200-2011": "cub200",
    "cars": "cars196",
    "cars-196": "cars196",
    "stanford_cars": "cars196",
    "stanford_online_products": "sop",
    "online_products": "sop",
    "in-shop": "inshop",
    "in_shop": "inshop",
    "deepfashion_inshop": "inshop",
}


def benchmark_name(name: str) -> str | None:
    """The canonical benchmark name (cub200, cars196, sop, inshop) for ``name`` or an alias, else None."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in BENCHMARKS else None


def load_benchmark(name: str, data_dir: str | os.PathLike | None) -> DatasetDict:
    """Load benchmark ``name`` (see :data:`BENCHMARKS`) from the local copy in ``data_dir``."""
    canonical = benchmark_name(name)
    if canonical is None:
        raise ValueError(f"Unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}.")
    if data_dir is None:
        raise ValueError(f"{canonical} cannot be downloaded here: pass --data_dir pointing at a local copy.")
    if not Path(data_dir).expanduser().exists():
        raise FileNotFoundError(f"data_dir {data_dir} does not exist (needed for {canonical}).")
    return BENCHMARKS[canonical](data_dir)
