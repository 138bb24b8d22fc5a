"""Compare an exported model run by transformers.js (Node) with the same model in Python (transformers).

    python scripts/transformers_js_check.py --model DIR [--images FOLDER] [--count 16] [--output FIGURES.json]

Embeds ``--count`` images (default: from the glyph test split, written to PNG files) with
``AutoModel`` + ``AutoImageProcessor`` and with ``pipeline("image-feature-extraction", DIR)`` of transformers.js
(``scripts/transformers_js_check.mjs``, fp32 and 8-bit), and reports the cosine of each pair. The two libraries'
Lanczos resizes (PIL, sharp) differ by a fraction of a grey level, so the bar is a cosine of at least 0.99 (fp32), not
equality; a folder exported with bicubic or bilinear resizing misses it (transformers.js point-samples those).
Needs Node and ``(cd scripts/transformers_js && npm install)``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

import crossmetric  # noqa: F401  (registers the model type)

SCRIPT = Path(__file__).resolve().parent / "transformers_js_check.mjs"
MIN_COSINE = 0.99


def glyph_images(folder: Path, count: int) -> list[Path]:
    """The first ``count`` glyph test images, saved as PNG files for Node to read."""
    from crossmetric.data.dml_dataset import load_dml_dataset

    split = load_dml_dataset("glyphs")["test"]
    step = max(1, len(split) // count)
    paths = []
    for n, row in enumerate(range(0, step * count, step)):
        paths.append(folder / f"glyph_{n:03d}.png")
        split[row]["image"].convert("RGB").save(paths[-1])
    return paths


def python_embeddings(model_dir: Path, paths: list[Path]) -> np.ndarray:
    """``pooler_output`` of ``AutoModel`` on the images, preprocessed by the folder's image processor."""
    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoImageProcessor.from_pretrained(model_dir)
    images = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        return model(**processor(images, return_tensors="pt")).pooler_output.numpy()


def node_embeddings(model_dir: Path, paths: list[Path], dtype: str) -> tuple[np.ndarray, str]:
    """Embeddings from transformers.js in Node, and its version."""
    command = ["node", str(SCRIPT), str(model_dir), "--dtype", dtype, *map(str, paths)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"transformers.js failed ({' '.join(command[:4])} ...):\n{result.stderr[-3000:]}")
    output = json.loads(result.stdout.strip().splitlines()[-1])
    return np.asarray(output["embeddings"], dtype=np.float32), output["transformers_js"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="exported folder with onnx/ (export --onnx)")
    parser.add_argument("--images", type=Path, default=None, help="folder of images (default: glyph test images)")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--output", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.images is not None:
            paths = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
            paths = paths[: args.count]
        else:
            paths = glyph_images(Path(tmp), args.count)
        reference = python_embeddings(args.model, paths)
        figures: dict = {"model": str(args.model), "images": len(paths)}
        for dtype in ("fp32", "q8"):
            got, version = node_embeddings(args.model, paths, dtype)
            norms = np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
            cosines = np.sum(got * reference, axis=1) / norms
            figures["transformers_js"] = version
            figures[dtype] = {"min_cosine": float(cosines.min()), "mean_cosine": float(cosines.mean())}
    print(json.dumps(figures, indent=2))
    if args.output is not None:
        args.output.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["fp32"]["min_cosine"] >= MIN_COSINE else 1


if __name__ == "__main__":
    sys.exit(main())
