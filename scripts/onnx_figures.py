"""Figures of an ONNX export against PyTorch, measured in one run, written to a JSON file.

    python scripts/onnx_figures.py --model EXPORT_DIR [--output onnx_figures.json] [--max_images N]

For ``onnx/model.onnx`` (fp32) and ``onnx/model_quantized.onnx`` (8-bit) of an export (``crossmetric export
--onnx``): the max difference of the embeddings from PyTorch on a batch of glyph test images; Recall@1 on the
glyph test split (every image queries all others; the trainer's evaluation preprocessing) for PyTorch, fp32 and
8-bit; CPU inference time per image for all three on the same preprocessed batch, with the same thread count,
and its ratio to PyTorch; the file sizes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from crossmetric import CrossMetricModel
from crossmetric.data.dml_dataset import load_dml_dataset
from crossmetric.data.transforms import attach_transform, build_transform, collate_fn
from crossmetric.evaluation.evaluator import Evaluator
from crossmetric.hub.onnx_export import split_recall_at_1
from crossmetric.inference.onnx_runtime import CHECK_FILE, FP32_FILE, INT8_FILE, ONNX_DIR, run_session, session


def batch_of(split, preprocessing: dict, count: int) -> torch.Tensor:
    """The first ``count`` images of ``split``, preprocessed for evaluation."""
    part = attach_transform(split.select(range(count)), build_transform(preprocessing, train=False))
    return collate_fn([part[i] for i in range(count)])["pixel_values"]


def seconds_per_image(run, pixels, repeats: int) -> float:
    """Median wall time of ``run(pixels)`` over ``repeats`` calls (after one warm-up), per image."""
    run(pixels)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run(pixels)
        times.append(time.perf_counter() - started)
    return statistics.median(times) / len(pixels)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--output", type=Path, default=Path("onnx_figures.json"))
    parser.add_argument("--max_images", type=int, default=None, help="use only the first N test images")
    parser.add_argument("--batch_size", type=int, default=64, help="batch for the difference and the timing")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--recall_from_export", action="store_true",
        help="take fp32 and 8-bit Recall@1 from onnx/export_check.json (the export measured them on the full split) "
        "instead of measuring all three again",
    )  # fmt: skip
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = CrossMetricModel.from_pretrained(args.model).eval()
    split = load_dml_dataset("glyphs")["test"]
    if args.max_images:
        split = split.select(range(min(args.max_images, len(split))))
    paths = {"fp32": args.model / ONNX_DIR / FP32_FILE, "int8": args.model / ONNX_DIR / INT8_FILE}
    sessions = {name: session(path, args.threads) for name, path in paths.items()}
    pixels = batch_of(split, model.config.preprocessing, min(args.batch_size, len(split)))

    with torch.no_grad():
        reference = model(pixels).pooler_output.numpy()
    figures: dict = {
        "model": str(args.model),
        "threads": args.threads,
        "batch_size": len(pixels),
        "image_size": model.config.image_size,
        "test_images": len(split),
        "bytes": {name: path.stat().st_size for name, path in paths.items()},
        "max_difference": {
            name: float(np.abs(run_session(s, pixels) - reference).max()) for name, s in sessions.items()
        },
    }

    def run_torch(batch: torch.Tensor) -> None:
        with torch.no_grad():
            model(batch)

    timing = {"pytorch": seconds_per_image(run_torch, pixels, args.repeats)}
    for name, onnx_session in sessions.items():
        timing[name] = seconds_per_image(lambda batch, s=onnx_session: run_session(s, batch), pixels, args.repeats)
    figures["ms_per_image"] = {name: value * 1000 for name, value in timing.items()}
    figures["time_ratio_to_pytorch"] = {name: timing[name] / timing["pytorch"] for name in sessions}

    if args.recall_from_export:
        check = json.loads((args.model / ONNX_DIR / CHECK_FILE).read_text())
        figures["recall_at_1"] = {"fp32": check["fp32_recall_at_1"], "int8": check["int8_recall_at_1"]}
        figures["recall_source"] = f"{ONNX_DIR}/{CHECK_FILE}: {check['eval_split']}, {check['eval_images']} images"
    else:
        started = time.perf_counter()
        recall = split_recall_at_1(paths, model.config.preprocessing, split)
        recall["pytorch"] = Evaluator(split, ks=(1,))(model, progress=False)["recall@1"]
        figures["recall_at_1"] = recall
        figures["recall_seconds"] = round(time.perf_counter() - started, 1)
    args.output.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
