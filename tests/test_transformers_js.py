"""transformers.js (Node) runs the exported folder and agrees with Python (skipped without Node and its packages:
``cd scripts/transformers_js && npm install``)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from _export_formats import image_files, pixel_values, tiny_full_export

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"

pytest.importorskip("onnxruntime")
if shutil.which("node") is None or not (SCRIPTS / "transformers_js/node_modules/@huggingface/transformers").is_dir():
    pytest.skip("Node or scripts/transformers_js/node_modules is missing", allow_module_level=True)


def test_transformers_js_pipeline_matches_python(tmp_path) -> None:
    model, directory, images = tiny_full_export(tmp_path)
    files = image_files(images)[:4]
    command = ["node", str(SCRIPTS / "transformers_js_check.mjs"), str(directory), *map(str, files)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = np.asarray(json.loads(result.stdout.strip().splitlines()[-1])["embeddings"], dtype=np.float32)
    with torch.no_grad():
        expected = model.embedder(pixel_values(directory, files)).pooler_output.numpy()
    cosines = np.sum(got * expected, axis=1) / np.linalg.norm(got, axis=1)
    assert cosines.min() >= 0.99, cosines


def test_transformers_js_preprocessing_matches_python(tmp_path) -> None:
    """The resize is where the libraries can differ: transformers.js's bilinear and bicubic are point-sampled
    (sharp's affine), PIL's are antialiased, which cost a real model 0.07 of cosine; Lanczos is antialiased in both.
    The shapes images are 40 px, resized to the model's 32 px, so the resize is exercised."""
    _, directory, images = tiny_full_export(tmp_path, onnx=False)
    files = image_files(images)[:4]
    command = ["node", str(SCRIPTS / "transformers_js_check.mjs"), str(directory), "--pixel-values", *map(str, files)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = pixel_values(directory, files).numpy()
    got = np.asarray(json.loads(result.stdout.strip().splitlines()[-1])["pixel_values"], dtype=np.float32)
    difference = np.abs(got.reshape(expected.shape) - expected)
    # normalised units (a grey level is 1 / (255 * std)): Lanczos measured mean 0.003, max 0.06; bicubic 0.016, 0.27
    assert difference.mean() < 0.008 and difference.max() < 0.15, (difference.mean(), difference.max())
