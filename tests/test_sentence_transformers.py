"""sentence-transformers loads an export (three JSON files, no Pooling module) and encodes as AutoModel does.

Both routes: a local folder after ``import crossmetric``, and a Hub repo with ``trust_remote_code`` in a process
where crossmetric cannot be imported; the Hub round trip also carries ``onnx/``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import _hub_server
import numpy as np
import pytest
import torch
import transformers.utils.hub
from _export_formats import image_files, pixel_values, tiny_full_export
from PIL import Image
from transformers import AutoModel

import crossmetric  # noqa: F401  (registers the model type: the route without trust_remote_code)
from crossmetric.model_cards.sentence_transformers_files import FILE_NAMES

pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402

hub_server = _hub_server.hub_server

# sentence-transformers with trust_remote_code, in a process where crossmetric cannot be imported.
_REMOTE_SCRIPT = """
import importlib.abc, sys
class BlockCrossmetric(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "crossmetric" or name.startswith("crossmetric."):
            raise ImportError("crossmetric is blocked in this process")
sys.meta_path.insert(0, BlockCrossmetric())
import numpy as np
from PIL import Image
from sentence_transformers import SentenceTransformer
model = SentenceTransformer(sys.argv[1], trust_remote_code=True, device="cpu")
assert "crossmetric" not in sys.modules
np.save(sys.argv[2], model.encode([Image.open(p).convert("RGB") for p in sys.argv[3:]]))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return tiny_full_export(tmp_path_factory.mktemp("st"), onnx=False)


def automodel_embeddings(directory, files) -> np.ndarray:
    model = AutoModel.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(pixel_values(directory, files)).pooler_output.numpy()


def encode_with_remote_code(model: str, files, tmp_path) -> np.ndarray:
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    command = [sys.executable, "-c", _REMOTE_SCRIPT, model, str(tmp_path / "out.npy"), *map(str, files)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return np.load(tmp_path / "out.npy")


def test_the_export_writes_the_sentence_transformers_files(exported) -> None:
    _, directory, _ = exported
    assert all((directory / name).is_file() for name in FILE_NAMES)
    module = json.loads((directory / "sentence_bert_config.json").read_text())
    assert module["modality_config"] == {"image": {"method": "forward", "method_output_name": "pooler_output"}}
    assert json.loads((directory / "config.json").read_text())["projection_dim"] == 16


def test_encode_after_import_crossmetric_equals_automodel(exported) -> None:
    _, directory, images = exported
    files = image_files(images)
    model = SentenceTransformer(str(directory), device="cpu")
    assert model.get_embedding_dimension() == 16
    got = model.encode([Image.open(f).convert("RGB") for f in files])
    np.testing.assert_allclose(got, automodel_embeddings(directory, files), atol=1e-5, rtol=0)


def test_hub_round_trip_carries_onnx_and_the_sentence_transformers_files(hub_server, tmp_path, monkeypatch) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # bound to the first endpoint used (test_hub_model)
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    _, directory, images = tiny_full_export(tmp_path)
    files = image_files(images)[:4]
    expected = automodel_embeddings(directory, files)
    assert main_push(directory) == 0

    from huggingface_hub import HfApi

    repo_files = set(HfApi(endpoint=hub_server.url).list_repo_files("tester/st-embedder"))
    assert {"onnx/model.onnx", "onnx/model_quantized.onnx", *FILE_NAMES} <= repo_files
    model = SentenceTransformer("tester/st-embedder", device="cpu")
    got = model.encode([Image.open(f).convert("RGB") for f in files])
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    got_remote = encode_with_remote_code("tester/st-embedder", files, tmp_path)
    np.testing.assert_allclose(got_remote, expected, atol=1e-5, rtol=0)

    from crossmetric.inference.onnx_runtime import OnnxEmbedder

    onnx = OnnxEmbedder("tester/st-embedder")(pixel_values(directory, files)).pooler_output.numpy()
    np.testing.assert_allclose(onnx, expected, atol=1e-4, rtol=0)
    assert not hub_server.token_exposures()


def main_push(directory) -> int:
    from crossmetric.cli.main import main

    return main(["push", "--model", str(directory), "--repo-id", "tester/st-embedder"])
