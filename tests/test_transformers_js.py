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
