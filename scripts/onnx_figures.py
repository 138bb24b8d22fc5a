"""Figures of an ONNX export against PyTorch, measured in one run, written to a JSON file.

    python scripts/onnx_figures.py --model EXPORT_DIR [--output onnx_figures.json] [--max_images N]
    python scripts/onnx_figures.py --model EXPORT_DIR --compare_reduce_range --split validation --output F.json

For ``onnx/model.onnx`` (fp32) and ``onnx/model_quantized.onnx`` (8-bit) of an export (``crossmetric export
--onnx``): the max difference of the embeddings from PyTorch on a batch of glyph test images; Recall@1 on the
glyph test split (every image queries all others; the trainer's evaluation preprocessing) for PyTorch, fp32 and
8-bit; CPU inference time per image for all three on the same preprocessed batch, with the same thread count,
and its ratio to PyTorch; the file sizes; the CPU features that decide 8-bit accuracy (AVX2, AVX-512, VNNI).

``--compare_reduce_range`` (issue 30) also quantizes the export's fp32 file the way exports did before, with full
8-bit weights (``reduce_range=False``), from the same 128 calibration images the export uses, and measures that
file beside the export's own 7-bit-weight file: Recall@1 and MAP@R of fp32 and both 8-bit files in one pass over
``--split`` (the export check's way, :func:`split_metrics`), and the time per image of each, timed in turns
(one call of each file per round) so that a busy machine slows both alike; ``time_ratio_7bit_to_8bit_weights`` is
the new file's time over the old one's. PyTorch's Recall@1 is then not measured (fp32 ONNX matches it to 1e-5).
``--split validation`` is the run's validation split (``--run_config``, default the main job's fields).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from crossmetric import CrossMetricModel
from crossmetric.data.dml_dataset import load_dml_dataset
from crossmetric.data.transforms import attach_transform, build_transform, collate_fn
from crossmetric.evaluation.evaluator import Evaluator
from crossmetric.hub.cpu_features import cpu_features
from crossmetric.hub.onnx_export import quantization_setting, quantize_int8, run_export_inputs, split_metrics
from crossmetric.inference.onnx_runtime import CHECK_FILE, FP32_FILE, INT8_FILE, ONNX_DIR, run_session, session
from crossmetric.training.config import TrainingConfig


def batch_of(split, preprocessing: dict, count: int) -> torch.Tensor:
    """The first ``count`` images of ``split``, preprocessed for evaluation."""
    part = attach_transform(split.select(range(count)), build_transform(preprocessing, train=False))
    return collate_fn([part[i] for i in range(count)])["pixel_values"]


def seconds_per_image(runs: dict, pixels, repeats: int) -> dict[str, float]:
    """Median wall time per image of each ``runs[name](pixels)`` over ``repeats`` rounds (after one warm-up round);
    each round calls every run once, in turns, so that load from other processes falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(pixels)
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run(pixels)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) / len(pixels) for name, values in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--output", type=Path, default=Path("onnx_figures.json"))
    parser.add_argument("--max_images", type=int, default=None, help="use only the first N images of the split")
    parser.add_argument("--split", choices=("test", "validation"), default="test", help="the glyph split to measure")
    parser.add_argument("--run_config", type=Path, default=None, help="the run's training_config.yaml (--split)")
    parser.add_argument(
        "--compare_reduce_range", action="store_true",
        help="also measure the export's fp32 file quantized with full 8-bit weights (reduce_range=False)",
    )  # fmt: skip
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
    config = TrainingConfig.from_yaml(args.run_config) if args.run_config else TrainingConfig()
    paths = {"fp32": args.model / ONNX_DIR / FP32_FILE, "int8": args.model / ONNX_DIR / INT8_FILE}
    if args.split == "validation" or args.compare_reduce_range:
        config.eval_split = args.split
        split, _, calibration = run_export_inputs(model, config)
    else:
        split = load_dml_dataset("glyphs")["test"]
    if args.compare_reduce_range:  # the file exports made before issue 30, from the export's calibration images
        old = Path(tempfile.mkdtemp(prefix="onnx_figures-")) / "model_quantized_8bit_weights.onnx"
        quantize_int8(paths["fp32"], old, calibration, reduce_range=False)
        paths["int8_8bit_weights"] = old
    if args.max_images:
        split = split.select(range(min(args.max_images, len(split))))
    sessions = {name: session(path, args.threads) for name, path in paths.items()}
    pixels = batch_of(split, model.config.preprocessing, min(args.batch_size, len(split)))

    with torch.no_grad():
        reference = model(pixels).pooler_output.numpy()
    figures: dict = {
        "model": str(args.model),
        "cpu": cpu_features(),
        "onnxruntime": onnxruntime.__version__,
        "threads": args.threads,
        "batch_size": len(pixels),
        "image_size": model.config.image_size,
        "split": f"glyphs ({args.split})",
        "split_images": len(split),
        "quantization": {"int8": quantization_setting(True)},
        "bytes": {name: path.stat().st_size for name, path in paths.items()},
        "max_difference": {
            name: float(np.abs(run_session(s, pixels) - reference).max()) for name, s in sessions.items()
        },
    }
    if args.compare_reduce_range:
        figures["quantization"]["int8_8bit_weights"] = quantization_setting(False)

    def run_torch(batch: torch.Tensor) -> None:
        with torch.no_grad():
            model(batch)

    runs = {"pytorch": run_torch}
    runs.update(
        {name: (lambda batch, s=onnx_session: run_session(s, batch)) for name, onnx_session in sessions.items()}
    )
    timing = seconds_per_image(runs, pixels, args.repeats)
    figures["ms_per_image"] = {name: value * 1000 for name, value in timing.items()}
    figures["time_ratio_to_pytorch"] = {name: timing[name] / timing["pytorch"] for name in sessions}
    if args.compare_reduce_range:
        figures["time_ratio_7bit_to_8bit_weights"] = timing["int8"] / timing["int8_8bit_weights"]

    if args.recall_from_export:
        check = json.loads((args.model / ONNX_DIR / CHECK_FILE).read_text())
        figures["recall_at_1"] = {"fp32": check["fp32_recall_at_1"], "int8": check["int8_recall_at_1"]}
        figures["recall_source"] = f"{ONNX_DIR}/{CHECK_FILE}: {check['eval_split']}, {check['eval_images']} images"
    else:
        started = time.perf_counter()
        metrics = split_metrics(paths, model.config.preprocessing, split)
        figures["recall_at_1"] = {name: values["recall@1"] for name, values in metrics.items()}
        figures["map_at_r"] = {name: values["map@r"] for name, values in metrics.items()}
        if not args.compare_reduce_range:
            figures["recall_at_1"]["pytorch"] = Evaluator(split, ks=(1,))(model, progress=False)["recall@1"]
        figures["recall_seconds"] = round(time.perf_counter() - started, 1)
    args.output.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
