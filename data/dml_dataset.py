"""Any image dataset in, as class-disjoint DML splits out.

:func:`load_dml_dataset` accepts the built-in glyph set, the four DML benchmarks (from local copies),
a local image folder (one sub-folder per class), a dataset saved with ``save_to_disk``, a
``Dataset``/``DatasetDict`` object, or a Hub id, and returns a ``DatasetDict`` with columns
``image`` and ``label`` (a ``ClassLabel`` shared by all splits) and splits ``train``, ``test``
(+ ``validation``), or ``train``, ``query``, ``gallery`` for In-Shop. DML evaluates on classes never
seen in training, so splits are always class-disjoint: an official split is checked, otherwise the
classes are split (sorted order or seeded shuffle).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from datasets import (
    ClassLabel,
    Dataset,
    DatasetDict,
    Image,
    IterableDataset,
    IterableDatasetDict,
    Value,
    concatenate_datasets,
    load_dataset,
    load_from_disk,
)

from .benchmarks import benchmark_name, load_benchmark

logger = logging.getLogger(__name__)

SplitStrategy = Literal["official", "sorted", "shuffle"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_dataset_name(name: str | os.PathLike) -> tuple[str, str]:
    """Classify a ``--dataset`` value as ``(kind, value)``.

    kind is ``"glyphs"``, ``"emoji"``, ``"benchmark"`` (value: cub200, cars196, sop or inshop), ``"saved"`` (a
    ``save_to_disk`` folder), ``"folder"`` (an image folder) or ``"hub"`` (a Hub dataset id). A
    path-like value that does not exist is an error rather than a Hub id. Names win over folders:
    write ``./glyphs`` for a local folder called glyphs.
    """
    text = os.fspath(name).strip()
    if text.lower() in ("glyphs", "emoji"):
        return text.lower(), text.lower()
    if benchmark := benchmark_name(text):
        return "benchmark", benchmark
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "saved", str(path)
        return "folder", str(path)
    if path.exists():
        raise ValueError(f"--dataset {text!r} is a file; pass an image folder (one sub-folder per class).")
    if _HUB_ID.match(text) and not text.startswith((".", "~")):
        return "hub", text
    raise ValueError(
        f"--dataset {text!r}: no such folder, and not glyphs, a benchmark ({'/'.join(_benchmark_names())}) "
        "or a Hub id (user/name)."
    )


def _benchmark_names() -> list[str]:
    from .benchmarks import BENCHMARKS

    return sorted(BENCHMARKS)


def _hub_offline() -> bool:
    import datasets.config

    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return bool(datasets.config.HF_HUB_OFFLINE) or any(f.lower() in ("1", "true", "yes", "on") for f in flags)


def _load_raw(dataset: Any, data_dir: str | os.PathLike | None) -> tuple[Dataset | DatasetDict, str]:
    """The dataset as loaded, before any column or split handling, and a hint for column errors."""
    if isinstance(dataset, (IterableDataset, IterableDatasetDict)):
        raise ValueError("Streaming (Iterable) datasets are not supported: load the dataset without streaming=True.")
    if isinstance(dataset, (Dataset, DatasetDict)):
        return dataset, ""
    if not isinstance(dataset, (str, os.PathLike)):
        raise TypeError(f"dataset must be a name, a path or a datasets Dataset/DatasetDict, got {type(dataset)}.")
    kind, value = resolve_dataset_name(dataset)
    if kind in ("glyphs", "emoji"):
        from .embedded import load_embedded  # shipped in the package; imported only when asked for

        return load_embedded(kind), ""
    if kind == "benchmark":
        return load_benchmark(value, data_dir), ""
    if kind == "saved":
        return load_from_disk(value), ""
    if kind == "folder":
        folders = [p for p in Path(value).iterdir() if p.is_dir()]
        if not folders:
            raise ValueError(f"Image folder {value} has no sub-folders: put each class's images in a sub-folder.")
        if len(folders) == 1 and not any(p.is_dir() for p in folders[0].iterdir()):  # datasets then drops labels
            raise ValueError(
                f"Image folder {value} has 1 class ({folders[0].name}); DML needs at least 2 classes, one sub-folder "
                "each."
            )
        return load_dataset("imagefolder", data_dir=value), " (an image folder needs one sub-folder per class)"
    if _hub_offline():
        raise ValueError(
            f"{value!r} is not glyphs, a benchmark name or an existing local path, so it would be a Hub dataset, "
            "but the Hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE). Pass a local folder or saved dataset."
        )
    try:
        return load_dataset(value, data_dir=os.fspath(data_dir) if data_dir else None), ""
    except Exception as error:  # network, auth or missing-repo errors: say what was tried
        raise ValueError(f"Could not load {value!r} from the Hugging Face Hub: {error}") from error


def _as_dict(raw: Dataset | DatasetDict) -> DatasetDict:
    return raw if isinstance(raw, DatasetDict) else DatasetDict(train=raw)


def label_array(split: Dataset, column: str = "label") -> np.ndarray:
    """The labels as a numpy array, read through Arrow (iterating ``split["label"]`` is ~100x slower)."""
    values = split.with_format("arrow")[column]
    if values.null_count or not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        return np.asarray(values.to_pylist(), dtype=object)  # strings, or None to report
    return values.to_numpy()


def _normalise_columns(dd: DatasetDict, image_column: str, label_column: str, hint: str) -> DatasetDict:
    """Check the columns, rename them to image/label, make the image an Image feature."""
    for name, split in dd.items():
        for column in (image_column, label_column):
            if column not in split.column_names:
                role = "image" if column == image_column else "label"
                raise ValueError(
                    f"Split {name!r} has no {role} column {column!r}{hint}; available columns: {split.column_names}. "
                    f"Pass {role}_column=<one of them>."
                )
    out = {}
    for name, split in dd.items():
        clashing = [c for c in ("image", "label") if c in split.column_names and c not in (image_column, label_column)]
        if clashing:
            split = split.remove_columns(clashing)
        split = split.rename_columns({k: v for k, v in ((image_column, "image"), (label_column, "label")) if k != v})
        feature = split.features["image"]
        if isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
            split = split.cast_column("image", Image())  # file paths
        elif not isinstance(feature, Image):
            raise ValueError(f"Column {image_column!r} of split {name!r} is {feature}, not images or image paths.")
        out[name] = split
    return DatasetDict(out)


def _encode_labels(dd: DatasetDict) -> DatasetDict:
    """One ClassLabel for all splits; string or arbitrary int labels become class indices."""
    features = [split.features["label"] for split in dd.values()]
    if all(isinstance(f, ClassLabel) for f in features) and len({tuple(f.names) for f in features}) == 1:
        return dd
    values = {}
    for name, split in dd.items():
        raw = label_array(split)
        feature = split.features["label"]
        if isinstance(feature, ClassLabel):
            raw = np.asarray(feature.int2str(raw.tolist()), dtype=object)
        if any(v is None for v in raw.tolist()):
            raise ValueError(f"Split {name!r} has missing (None) labels; drop or label those examples first.")
        values[name] = raw
    uniques = sorted({v for raw in values.values() for v in raw.tolist()}, key=lambda v: (isinstance(v, str), v))
    index = {v: i for i, v in enumerate(uniques)}
    label = ClassLabel(names=[str(v) for v in uniques])
    return DatasetDict(
        {
            name: split.remove_columns("label").add_column(
                "label", [index[v] for v in values[name].tolist()], feature=label
            )
            for name, split in dd.items()
        }
    )


def _classes_by_split(dd: DatasetDict) -> dict[str, set[int]]:
    return {name: set(np.unique(label_array(split)).tolist()) for name, split in dd.items()}


def _check_disjoint(dd: DatasetDict, groups: list[list[str]]) -> None:
    classes = _classes_by_split(dd)
    sets = {"+".join(g): set().union(*(classes[s] for s in g)) for g in groups}
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            overlap = sets[a] & sets[b]
            if overlap:
                shown = dd[groups[0][0]].features["label"].int2str(sorted(overlap)[:5])
                raise ValueError(
                    f"Splits {a!r} and {b!r} share {len(overlap)} classes (e.g. {shown}); DML needs class-disjoint "
                    "splits. Use split_strategy='sorted' or 'shuffle' to re-split by class."
                )


def _select_classes(split: Dataset, classes: set[int]) -> Dataset:
    return split.select(np.flatnonzero(np.isin(label_array(split), sorted(classes))).tolist())


def _split_by_class(ds: Dataset, strategy: str, seed: int) -> DatasetDict:
    classes = np.unique(label_array(ds))
    if strategy == "shuffle":
        classes = np.random.default_rng(seed).permutation(classes)
    n_train = (len(classes) + 1) // 2
    return DatasetDict(
        train=_select_classes(ds, set(classes[:n_train].tolist())),
        test=_select_classes(ds, set(classes[n_train:].tolist())),
    )


def carve_validation(dd: DatasetDict, fraction: float, strategy: str, seed: int) -> DatasetDict:
    """Move a (seeded, or sorted) fraction of the train classes into a class-disjoint ``validation`` split."""
    classes = np.unique(label_array(dd["train"]))
    n_validation = max(1, round(fraction * len(classes)))
    if n_validation > len(classes) - 2:
        raise ValueError(
            f"validation_fraction={fraction} takes {n_validation} of the {len(classes)} train classes, leaving fewer "
            "than 2 to train on. Lower validation_fraction."
        )
    if strategy != "sorted":
        classes = np.random.default_rng([seed, 1]).permutation(classes)
    validation = set(classes[-n_validation:].tolist())
    out = dict(dd)
    out["train"] = _select_classes(dd["train"], set(classes.tolist()) - validation)
    out["validation"] = _select_classes(dd["train"], validation)
    return DatasetDict(out)


def _check_splits(dd: DatasetDict) -> None:
    """Errors for splits without positive pairs; warnings for evaluation classes with one image."""
    all_classes = set().union(*_classes_by_split(dd).values())
    if len(all_classes) < 2:
        raise ValueError(f"The dataset has {len(all_classes)} class(es); DML needs at least 2 (better: hundreds).")
    for name, split in dd.items():
        if len(split) == 0:
            raise ValueError(f"Split {name!r} is empty.")
        counts = np.bincount(label_array(split))
        counts = counts[counts > 0]
        if name in ("query", "gallery"):
            continue  # a query's positives are in the gallery, checked below
        if counts.max() < 2:
            raise ValueError(
                f"Every class in split {name!r} has fewer than 2 images, so it has no positive pairs; "
                "DML needs at least 2 images for (most) classes."
            )
        singles = int((counts < 2).sum())
        if singles and name != "train":
            logger.warning(
                "%d of %d classes in split %r have only 1 image: as queries they have no match, which lowers "
                "Recall@K for every model alike.",
                singles,
                len(counts),
                name,
            )
    if "query" in dd and "gallery" in dd:
        orphans = _classes_by_split(dd)["query"] - _classes_by_split(dd)["gallery"]
        if orphans:
            logger.warning("%d query classes have no image in the gallery split.", len(orphans))


def load_dml_dataset(
    dataset: Any,
    *,
    data_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    label_column: str = "label",
    split_strategy: SplitStrategy = "official",
    seed: int = 0,
    validation_fraction: float = 0.0,
    drop_unreadable: bool = True,
) -> DatasetDict:
    """Load ``dataset`` as class-disjoint DML splits with columns ``image`` and ``label`` (a ClassLabel).

    Args:
        dataset: ``"glyphs"`` or ``"emoji"``; ``"cub200"``, ``"cars196"``, ``"sop"`` or ``"inshop"`` (read from
            ``data_dir``); an image folder (one sub-folder per class, optionally under train/ and
            test/); a ``save_to_disk`` folder; a ``Dataset``/``DatasetDict``; or a Hub id (online only).
        data_dir: where a benchmark's local copy lies (or a Hub dataset's data_dir).
        image_column, label_column: the source's column names; labels may be strings or ints.
        split_strategy: ``"official"`` keeps the source's train/test (or train/query/gallery) splits,
            after checking they are class-disjoint, and falls back to ``"sorted"`` when the source has
            none; ``"sorted"`` puts the first half of the sorted classes in train, ``"shuffle"`` a
            seeded random half. Both re-split the union of all source splits.
        seed: seed of the ``"shuffle"`` strategy and of the validation classes.
        validation_fraction: fraction of the train classes moved to a class-disjoint ``validation`` split.
        drop_unreadable: decode every image once and drop those that cannot be decoded, with a count in the log
            (the embedded benchmarks, rendered by us, are not checked).

    Returns:
        ``DatasetDict`` with ``train`` and ``test`` (+ ``validation``), or ``train``, ``query``, ``gallery``.
    """
    if split_strategy not in ("official", "sorted", "shuffle"):
        raise ValueError(f"split_strategy must be 'official', 'sorted' or 'shuffle', got {split_strategy!r}.")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must lie in [0, 1), got {validation_fraction}.")
    raw, hint = _load_raw(dataset, data_dir)
    dd = _encode_labels(_normalise_columns(_as_dict(raw), image_column, label_column, hint))
    if drop_unreadable and not (isinstance(dataset, str) and dataset.lower() in ("glyphs", "emoji")):
        from .image_loading import filter_unreadable

        # Scraped data holds truncated or non-image files: every command drops them up front (with a count in the
        # log), rather than train stopping mid-run or evaluate refusing a folder that train accepted.
        dd, _ = filter_unreadable(dd)

    official = None
    if split_strategy == "official":
        if {"train", "query", "gallery"} <= set(dd):
            official = ["train", "query", "gallery"]
        elif {"train", "test"} <= set(dd):
            official = ["train", "test"] + (["validation"] if "validation" in dd else [])
        elif len(dd) > 1:
            logger.warning("Splits %s are not train/test; re-splitting all of them by sorted class order.", list(dd))
    if official is not None:
        ignored = sorted(set(dd) - set(official))
        if ignored:
            logger.warning("Ignoring splits %s (not part of the official train/test protocol).", ignored)
        if "validation" in official and validation_fraction > 0:
            raise ValueError("The dataset already has a validation split; leave validation_fraction at 0.")
        dd = DatasetDict({name: dd[name] for name in official})
        groups = [["train"], ["query", "gallery"]] if "query" in dd else [[name] for name in official]
        _check_disjoint(dd, groups)
    else:
        if split_strategy == "official":
            logger.info("No official class-disjoint split; splitting classes in sorted order.")
        merged = (
            dd[next(iter(dd))]
            if len(dd) == 1
            else concatenate_datasets([split.select_columns(["image", "label"]) for split in dd.values()])
        )
        dd = _split_by_class(merged, "shuffle" if split_strategy == "shuffle" else "sorted", seed)
    if validation_fraction > 0:
        dd = carve_validation(dd, validation_fraction, split_strategy, seed)
    _check_splits(dd)
    return dd


def describe_dataset(dd: DatasetDict) -> str:
    """Per split: images, classes and images per class (min / median / max), one line each."""
    lines = []
    for name, split in dd.items():
        counts = np.bincount(label_array(split)) if len(split) else np.zeros(0, dtype=int)
        counts = counts[counts > 0]
        if len(counts):
            stats = f"images per class min {counts.min()}, median {np.median(counts):g}, max {counts.max()}"
        else:
            stats = "empty"
        lines.append(f"{name}: {len(split)} images, {len(counts)} classes ({stats})")
    return "\n".join(lines)
