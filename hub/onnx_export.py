"""``crossmetric export --onnx``: ``onnx/model.onnx`` (fp32) and ``onnx/model_quantized.onnx`` (8-bit), checked.

The layout is the one transformers.js and ONNX Runtime users expect next to ``config.json`` and
``preprocessor_config.json``: transformers.js loads ``onnx/model.onnx`` (``dtype: "fp32"``) and, in the browser,
``onnx/model_quantized.onnx`` by default.

- Export: ``torch.onnx.export(dynamo=True)`` with one input ``pixel_values`` (dynamic batch, static H × W: the image
  processor always centre-crops to ``image_size``, and a dynamic H × W made a real export take minutes) and two
  outputs, ``last_hidden_state`` and ``pooler_output`` (the L2-normalised embedding), weights inside the file.
- Quantization: ``onnxruntime.quantization.quantize_static``, QDQ format, per-channel signed weights and unsigned
  8-bit activations calibrated on a batch of real (training) images (:data:`QUANTIZATION`). The weights use 7 bits
  (``reduce_range=True``): ONNX Runtime's 8-bit kernels on x86 CPUs without VNNI (AVX2, AVX-512 without VNNI) sum
  each pair of u8 × s8 products in 16 bits, which 2 × 255 × 127 overflows and 2 × 255 × 64 does not. Measured
  there (AMD EPYC, AVX2, no VNNI; glyph validation split) on the main job's model after its first epoch, Recall@1 /
  MAP@R: fp32 0.900 / 0.649, 7-bit weights 0.895 / 0.640, full 8-bit weights 0.883 / 0.580; the 7-bit file is not
  slower (0.95x the time per image, 1 thread: ``scripts/benchmark_results/onnx_reduce_range_cpu``). Dynamic
  quantization, which needs no calibration, was measured first on a glyph-trained lite0 and lost about 5 points of
  Recall@1 (4 per-channel).
- Checks, both recorded in ``onnx/export_check.json`` and the model card: ONNX Runtime against PyTorch on a batch
  of real images (max difference of ``pooler_output`` at most 1e-4, else the export fails and writes no ``onnx/``),
  and, when an evaluation split is given, Recall@1 and MAP@R of fp32 and 8-bit on it (8-bit Recall@1 must stay within
  1 point of fp32). The record also holds the quantization setting (``int8_quantization``) and the CPU features of
  the machine that ran the check (``check_cpu``, :mod:`.cpu_features`): a VNNI machine cannot see saturation.
  An 8-bit file that misses its check (or whose quantization fails) is left out, with a one-line warning and the
  reason in ``export_check.json`` (``int8_skipped``) and the card; the checked fp32 file is written all the same, and
  the ONNX backends (``search``, ``serve``) run it.
- The exporters' progress lines (torch.onnx's "Optimize the ONNX graph", onnxruntime's "consider pre-processing
  before quantization") show only at ``--log_level debug``.

Needs the optional extra: ``pip install "crossmetric[onnx]"`` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..inference.embedding import EvalTransform, embed_images, embedding_fingerprint
from ..inference.onnx_runtime import (
    CHECK_FILE,
    FP32_FILE,
    INPUT_NAME,
    INT8_FILE,
    ONNX_DIR,
    OUTPUT_NAMES,
    require_onnx,
    run_session,
    session,
)  # fmt: skip
from ..modeling.modeling_crossmetric import replace_directory
from .cpu_features import cpu_features

logger = logging.getLogger(__name__)

MAX_FP32_DIFFERENCE = 1e-4
MAX_RECALL_DROP = 0.01  # Recall@1 as a fraction: 1 point
# The portable setting: accurate on x86 CPUs with and without VNNI (see the module docstring). reduce_range=True
# quantizes the weights to [-64, 64]: no pair of u8 x s8 products can then overflow a 16-bit sum.
QUANTIZATION: dict[str, Any] = {
    "method": "quantize_static", "format": "QDQ", "per_channel": True, "activation_type": "QUInt8",
    "weight_type": "QInt8", "reduce_range": True, "weight_bits": 7, "calibrate_method": "MinMax",
}  # fmt: skip


def quantization_setting(reduce_range: bool = QUANTIZATION["reduce_range"]) -> dict[str, Any]:
    """The setting :func:`quantize_int8` uses, as recorded in ``export_check.json`` (``int8_quantization``)."""
    return {**QUANTIZATION, "reduce_range": reduce_range, "weight_bits": 7 if reduce_range else 8}


class _TupleOutputs(torch.nn.Module):
    """The embedder with plain tuple outputs ``(last_hidden_state, pooler_output)``, as the ONNX graph returns."""

    def __init__(self, embedder: torch.nn.Module) -> None:
        super().__init__()
        self.embedder = embedder

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedder(pixel_values, return_dict=False)


def export_fp32(embedder: torch.nn.Module, path: Path) -> Path:
    """Write ``embedder`` (a ``CrossMetricModel``) to ``path`` as one self-contained ONNX file (dynamic batch)."""
    size = int(embedder.config.image_size)
    example = torch.randn(2, 3, size, size)
    was_training = embedder.training
    embedder.eval()
    try:
        torch.onnx.export(
            _TupleOutputs(embedder).cpu().float().eval(),
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1, max=65536)}},
            external_data=False,
            verbose=None if logger.isEnabledFor(logging.DEBUG) else False,  # its progress lines: debug only
        )
    finally:
        embedder.train(was_training)
    return path


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    calibration_pixel_values: torch.Tensor,
    *,
    reduce_range: bool = QUANTIZATION["reduce_range"],
) -> Path:
    """8-bit static quantization of ``fp32_path`` into ``int8_path`` (:data:`QUANTIZATION`: QDQ, per-channel 7-bit
    weights), with activation ranges calibrated on ``calibration_pixel_values`` (preprocessed real images, e.g. 128
    training images). ``reduce_range=False`` (full 8-bit weights) is kept for measurements only: it saturates on x86
    CPUs without VNNI."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    batches = iter(torch.split(calibration_pixel_values.float(), 32))

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(batches, None)
            return None if batch is None else {INPUT_NAME: batch.numpy()}

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs one INFO line per tensor on the root logger
    demote = _DemoteToDebug()
    root.addFilter(demote)  # ... and its advice ("consider pre-processing before quantization") as root warnings
    try:
        quantize_static(
            str(fp32_path), str(int8_path), Reader(), quant_format=QuantFormat[QUANTIZATION["format"]],
            per_channel=QUANTIZATION["per_channel"], reduce_range=reduce_range,
            activation_type=QuantType[QUANTIZATION["activation_type"]],
            weight_type=QuantType[QUANTIZATION["weight_type"]],
        )  # fmt: skip
    finally:
        root.removeFilter(demote)
        root.setLevel(level)
    return int8_path


class _DemoteToDebug(logging.Filter):
    """Re-log the quantizer's warnings on the root logger at DEBUG on ``onnxruntime.quantization`` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname:
            return True
        logging.getLogger("onnxruntime.quantization").debug(record.getMessage())
        return False


def max_difference(embedder: torch.nn.Module, onnx_path: Path, pixel_values: torch.Tensor) -> float:
    """Max absolute difference of ``pooler_output`` between PyTorch and ONNX Runtime on ``pixel_values``."""
    embedder.eval()
    with torch.no_grad():
        expected = embedder(pixel_values.float()).pooler_output.numpy()
    return float(np.abs(run_session(session(onnx_path), pixel_values) - expected).max())


def split_metrics(
    paths: dict[str, Path], preprocessing: dict[str, Any], split: Any, batch_size: int = 256
) -> dict[str, dict[str, float]]:
    """Recall@1 and MAP@R (``{"recall@1", "map@r"}``) of each ONNX file (name -> path) on a ``datasets`` split
    (``image``, ``label``), every image querying all others, with the evaluation preprocessing (resize, centre crop)
    the trainer uses; one pass of the embedding loop runs every file on each batch."""
    from ..data.dml_dataset import label_array
    from ..evaluation.metrics import retrieval_metrics

    names, sessions = list(paths), [session(path) for path in paths.values()]

    def every_file(_: Any, pixel_values: torch.Tensor) -> dict[str, np.ndarray]:
        outputs = [run_session(onnx_session, pixel_values) for onnx_session in sessions]
        return {"embeddings": outputs[0], **dict(zip(names[1:], outputs[1:]))}

    result = embed_images(
        None, EvalTransform(preprocessing), split, batch_size, progress=False, forward=every_file,
        skip_unreadable=False,
    )  # fmt: skip
    embedded = {names[0]: result.embeddings, **result.extras}
    labels = np.asarray(label_array(split), dtype=np.int64)
    metrics = {name: retrieval_metrics(embedded[name], labels, ks=(1,), nmi=False, progress=False) for name in names}
    return {name: {key: metrics[name][key] for key in ("recall@1", "map@r")} for name in names}


def split_recall_at_1(
    paths: dict[str, Path], preprocessing: dict[str, Any], split: Any, batch_size: int = 256
) -> dict[str, float]:
    """Recall@1 of each ONNX file (name -> path) on ``split``: :func:`split_metrics`'s ``recall@1``."""
    return {name: values["recall@1"] for name, values in split_metrics(paths, preprocessing, split, batch_size).items()}


def _quantize_and_check(
    embedder: torch.nn.Module,
    fp32: Path,
    int8_path: Path,
    calibration: torch.Tensor,
    check_pixel_values: torch.Tensor,
    eval_split: Any | None,
    eval_name: str | None,
) -> dict[str, Any]:
    """Quantize ``fp32`` into ``int8_path`` and check it; the figures for ``export_check.json``.

    An 8-bit file that cannot be made, or whose Recall@1 on ``eval_split`` is more than :data:`MAX_RECALL_DROP`
    below fp32's, is deleted: the report then holds ``int8_skipped`` (the reason) and a one-line warning says so.
    """
    report: dict[str, Any] = {"int8_quantization": quantization_setting(), "check_cpu": cpu_features()}
    try:
        quantize_int8(fp32, int8_path, calibration)
    except Exception as error:  # the quantizer's own failure: fp32 alone still serves
        reason = f"8-bit quantization failed: {type(error).__name__}: {error}"
    else:
        report["int8_max_difference"] = max_difference(embedder, int8_path, check_pixel_values)
        report["int8_bytes"] = int8_path.stat().st_size
        reason = None
        if eval_split is not None:
            metrics = split_metrics({"fp32": fp32, "int8": int8_path}, embedder.config.preprocessing, eval_split)
            recall = {name: values["recall@1"] for name, values in metrics.items()}
            report.update(
                eval_split=eval_name, eval_images=len(eval_split),
                fp32_recall_at_1=recall["fp32"], int8_recall_at_1=recall["int8"],
                fp32_map_at_r=metrics["fp32"]["map@r"], int8_map_at_r=metrics["int8"]["map@r"],
            )  # fmt: skip
            if recall["fp32"] - recall["int8"] > MAX_RECALL_DROP:
                reason = (
                    f"8-bit Recall@1 on {eval_name} is {recall['int8']:.4f}, more than {MAX_RECALL_DROP * 100:g} "
                    f"point below fp32's {recall['fp32']:.4f}"
                )
    if reason is not None:
        int8_path.unlink(missing_ok=True)
        report.pop("int8_bytes", None)
        report["int8_skipped"] = reason
        logger.warning("%s left out: %s; %s is written and checked.", INT8_FILE, reason, FP32_FILE)
    return report


def export_onnx(
    embedder: torch.nn.Module,
    directory: str | os.PathLike,
    check_pixel_values: torch.Tensor,
    *,
    calibration_pixel_values: torch.Tensor | None = None,
    eval_split: Any | None = None,
    eval_name: str | None = None,
) -> dict[str, Any]:
    """Write ``directory/onnx/`` (fp32 and, when it passes its check, 8-bit) for ``embedder``; return the check's
    figures.

    ``check_pixel_values`` is a preprocessed batch of real images for the PyTorch comparison (also the 8-bit
    calibration data unless ``calibration_pixel_values`` is given); ``eval_split`` (a
    ``datasets`` split with ``image`` and ``label``) adds the Recall@1 comparison of fp32 and 8-bit. The folder is
    written beside the target and swapped in, so a failed fp32 check leaves no ``onnx/`` behind (and no old one); an
    8-bit file that fails its check is only left out (``int8_skipped`` in the report says why).
    """
    require_onnx()
    target = Path(directory) / ONNX_DIR
    staging = Path(tempfile.mkdtemp(prefix=f".{ONNX_DIR}.partial-", dir=directory))
    try:
        started = time.perf_counter()
        fp32 = export_fp32(embedder, staging / FP32_FILE)
        report: dict[str, Any] = {
            "check_batch_size": int(check_pixel_values.shape[0]),
            "fp32_max_difference": max_difference(embedder, fp32, check_pixel_values),
            "fp32_bytes": fp32.stat().st_size,
            "fingerprint": embedding_fingerprint(embedder),
        }
        if report["fp32_max_difference"] > MAX_FP32_DIFFERENCE:
            raise ValueError(
                f"ONNX export check failed: ONNX Runtime differs from PyTorch by {report['fp32_max_difference']:.2e} "
                f"(more than {MAX_FP32_DIFFERENCE:g}) on a batch of real images; {FP32_FILE} is not written."
            )
        calibration = check_pixel_values if calibration_pixel_values is None else calibration_pixel_values
        report["calibration_images"] = int(calibration.shape[0])
        report.update(_quantize_and_check(embedder, fp32, staging / INT8_FILE, calibration, check_pixel_values,
                                          eval_split, eval_name))  # fmt: skip
        report["export_seconds"] = round(time.perf_counter() - started, 1)
        (staging / CHECK_FILE).write_text(json.dumps(report, indent=2) + "\n")
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("Wrote %s: %s", target, report)
    return report


def export_onnx_for_run(
    embedder: torch.nn.Module, directory: str | os.PathLike, config: Any, recall: str = "auto", check_images: int = 8
) -> dict[str, Any]:
    """:func:`export_onnx` with real images of the run's dataset (``config``: its ``TrainingConfig``).

    The PyTorch comparison uses the evaluation split's first ``check_images`` images; the 8-bit calibration 128
    training images (seeded shuffle). ``recall``: ``"on"`` measures Recall@1
    of fp32 and 8-bit on the whole split, ``"off"`` skips it, ``"auto"`` measures it for the glyph benchmark only
    (12,000 images: about a minute on a CPU), where the card's Recall@1 comes from.
    """
    if recall not in ("auto", "on", "off"):
        raise ValueError(f"--onnx_recall must be auto, on or off, got {recall!r}.")
    split, pixel_values, calibration = run_export_inputs(embedder, config, check_images)
    measure = recall == "on" or (recall == "auto" and str(config.dataset).lower() == "glyphs")
    return export_onnx(
        embedder, directory, pixel_values, calibration_pixel_values=calibration,
        eval_split=split if measure else None, eval_name=run_split_name(config),
    )  # fmt: skip


def run_split_name(config: Any) -> str:
    """How ``export_check.json`` names the run's evaluation split, e.g. ``"glyphs (validation)"``."""
    return f"{Path(str(config.dataset)).name} ({config.eval_split})"


def run_export_inputs(embedder: torch.nn.Module, config: Any, check_images: int = 8) -> tuple[Any, torch.Tensor, Any]:
    """``(evaluation split, check batch, calibration batch)`` of a run (``config``: its ``TrainingConfig``), as
    :func:`export_onnx_for_run` uses them: the split's first ``check_images`` images, and 128 training images
    (seeded shuffle), both with the evaluation preprocessing."""
    from ..data.dml_dataset import load_dml_dataset
    from ..data.transforms import attach_transform, build_transform, collate_fn

    dataset = load_dml_dataset(
        config.dataset, data_dir=config.data_dir, image_column=config.image_column, label_column=config.label_column,
        split_strategy=config.split_strategy, seed=config.seed, validation_fraction=config.validation_fraction,
    )  # fmt: skip
    split = dataset[config.eval_split]
    first = attach_transform(split.select(range(min(check_images, len(split)))), build_transform(
        embedder.config.preprocessing, train=False
    ))  # fmt: skip
    pixel_values = collate_fn([first[i] for i in range(len(first))])["pixel_values"]
    train = dataset["train"].shuffle(seed=0)
    train = attach_transform(train.select(range(min(128, len(train)))), build_transform(
        embedder.config.preprocessing, train=False
    ))  # fmt: skip
    calibration = collate_fn([train[i] for i in range(len(train))])["pixel_values"]
    return split, pixel_values, calibration
