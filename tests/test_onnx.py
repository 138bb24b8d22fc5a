"""ONNX export: ONNX Runtime equals PyTorch, the 8-bit model ranks, and ``--backend onnx`` builds the same index."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from _export_formats import image_files, pixel_values, tiny_full_export

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from crossmetric.cli.main import main  # noqa: E402
from crossmetric.hub import onnx_export  # noqa: E402
from crossmetric.inference.onnx_runtime import OnnxEmbedder  # noqa: E402
from crossmetric.retrieval.index import EmbeddingIndex  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return tiny_full_export(tmp_path_factory.mktemp("onnx"))


@pytest.mark.parametrize("batch_size", [1, 5])
def test_onnx_runtime_equals_pytorch(exported, batch_size) -> None:
    model, directory, images = exported
    pixels = pixel_values(directory, image_files(images)[:batch_size])
    session = onnx_export.session(directory / "onnx" / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
    tokens, embeddings = session.run(None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        expected = model.embedder(pixels)
    assert embeddings.shape == (batch_size, 16)
    np.testing.assert_allclose(embeddings, expected.pooler_output.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(tokens, expected.last_hidden_state.numpy(), atol=1e-4, rtol=0)


def test_the_export_records_its_check_and_both_files(exported) -> None:
    _, directory, _ = exported
    check = json.loads((directory / "onnx" / "export_check.json").read_text())
    assert check["fp32_max_difference"] <= 1e-4
    assert check["check_batch_size"] == 5
    onnx_dir = directory / "onnx"
    assert (onnx_dir / "model_quantized.onnx").stat().st_size < (onnx_dir / "model.onnx").stat().st_size
    assert not list(directory.glob(".onnx.partial-*"))


def test_the_quantized_model_loads_and_ranks(exported) -> None:
    model, directory, images = exported
    files = image_files(images)
    pixels = pixel_values(directory, files)
    quantized = OnnxEmbedder(directory, quantized=True)(pixels).pooler_output.numpy()
    with torch.no_grad():
        reference = model.embedder(pixels).pooler_output.numpy()
    np.testing.assert_allclose(np.linalg.norm(quantized, axis=1), 1.0, atol=1e-3)
    # each 8-bit embedding finds its own image first among the fp32 (PyTorch) embeddings
    assert (np.argmax(quantized @ reference.T, axis=1) == np.arange(len(files))).all()


def test_index_build_with_the_onnx_backend_gives_the_pytorch_neighbours(exported, tmp_path, capsys) -> None:
    _, directory, images = exported
    for backend in ("torch", "onnx"):
        argv = ["index", "build", "--model", str(directory), "--images", str(images), "--device", "cpu"]
        assert main([*argv, "--output_dir", str(tmp_path / backend), "--backend", backend]) == 0
    by_torch, by_onnx = EmbeddingIndex.load(tmp_path / "torch"), EmbeddingIndex.load(tmp_path / "onnx")
    assert by_onnx.ids == by_torch.ids and by_onnx.labels == by_torch.labels
    np.testing.assert_allclose(by_onnx.embeddings, by_torch.embeddings, atol=1e-4, rtol=0)
    assert by_onnx.model["fingerprint"] == by_torch.model["fingerprint"]
    _, torch_rows = by_torch.search_arrays(by_torch.embeddings, k=3)
    _, onnx_rows = by_onnx.search_arrays(by_onnx.embeddings, k=3)
    np.testing.assert_array_equal(onnx_rows[:, 0], torch_rows[:, 0])

    query = str(image_files(images)[4])
    results = {}
    for backend in ("torch", "onnx"):
        capsys.readouterr()
        argv = ["search", "--model", str(directory), "--index", str(tmp_path / backend), query, "--json"]
        assert main([*argv, "--top_k", "3", "--backend", backend, "--device", "cpu"]) == 0
        results[backend] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert [r["id"] for r in results["onnx"]] == [r["id"] for r in results["torch"]]
    assert results["onnx"][0]["id"] == "class_01/1.png"


def test_embedding_index_runs_through_onnx_runtime_without_a_pytorch_model(exported) -> None:
    _, directory, images = exported
    index = EmbeddingIndex.from_folder(str(directory), str(images), backend="onnx", progress=False)
    assert len(index) == len(image_files(images))
    assert index.model["name_or_path"] == str(directory)


def test_missing_onnx_runtime_says_which_extra_to_install(exported, tmp_path, monkeypatch, capsys) -> None:
    _, directory, _ = exported
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "crossmetric\[onnx\]"'):
        onnx_export.require_onnx()
    assert main(["export", "--checkpoint", str(tmp_path), "--output_dir", str(tmp_path / "out"), "--onnx"]) == 2
    assert 'pip install "crossmetric[onnx]"' in capsys.readouterr().err


def test_onnx_backend_without_onnx_files_names_the_export_flag(exported, tmp_path) -> None:
    _, directory, images = exported
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (plain / name).write_text((directory / name).read_text())
    with pytest.raises(FileNotFoundError, match="--onnx"):
        OnnxEmbedder(plain)


def test_the_card_shows_every_route_and_the_onnx_check(exported) -> None:
    from crossmetric.model_cards.model_card import CrossMetricModelCardData, render_model_card

    model, directory, _ = exported
    report = json.loads((directory / "onnx" / "export_check.json").read_text())
    report.update(eval_split="glyphs (test)", eval_images=12, fp32_recall_at_1=0.75, int8_recall_at_1=0.7456)
    data = CrossMetricModelCardData.from_config(model.config, model_id="me/embedder", onnx=report)
    card = str(render_model_card(data))
    for route in (
        "AutoModel",
        '"image-feature-extraction"',
        "SentenceTransformer(",
        "onnxruntime.Inference",
        "@huggingface/transformers",
        "--backend onnx",
        "onnx/model_quantized.onnx",
        "modules.json",
    ):
        assert route in card, route
    assert "fp32 0.7500, 8-bit\n0.7456" in card
    without = str(render_model_card(CrossMetricModelCardData.from_config(model.config)))
    assert "--onnx" in without and "onnxruntime.Inference" not in without
