"""ONNX export: ONNX Runtime equals PyTorch, the 8-bit model ranks, and ``--backend onnx`` builds the same index."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from _export_formats import image_files, pixel_values, tiny_full_export
from _training_fixtures import make_shapes_folder

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning  # noqa: E402
from crossmetric.cli.main import main  # noqa: E402
from crossmetric.hub import onnx_export  # noqa: E402
from crossmetric.hub.cpu_features import cpu_features, has_vnni  # noqa: E402
from crossmetric.inference.onnx_runtime import OnnxEmbedder  # noqa: E402
from crossmetric.modeling.modeling_crossmetric import save_embedder  # noqa: E402
from crossmetric.retrieval.index import EmbeddingIndex  # noqa: E402
from crossmetric.training.embedding_init import principal_projection  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return tiny_full_export(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def separated(tmp_path_factory):
    """``(embedder, export folder, 12 image files)`` whose fp32 embeddings are well separated, exported with ``onnx/``.

    12 shapes of 12 classes (colour and shape differ); the tiny random embedder's pooled features of them barely differ
    (nearest other image at cosine 0.94-0.99), so its embedding layer is set as the trainer's ``embedding_init=pca``
    sets it, to the whitened PCA of those features: the fp32 embeddings are then nearly orthogonal (nearest other at
    cosine -0.08), and only an 8-bit file that garbles them reorders them. Measured on an AVX2 CPU without VNNI: 7-bit
    weights find all 12 images first (margin 0.48), full 8-bit weights 7 of 12.
    """
    root = tmp_path_factory.mktemp("onnx_separated")
    torch.manual_seed(0)
    config = CrossMetricConfig(backbone="test_resnet", embedding_dim=16, image_size=32, cia_dim=16, cia_heads=2)
    embedder = CrossMetricForMetricLearning(config).embedder.eval()
    files = image_files(make_shapes_folder(root / "shapes", num_classes=12, per_class=1))
    directory = save_embedder(embedder, root / "export")  # the image processor, for pixel_values
    pixels = pixel_values(directory, files)
    with torch.no_grad():
        weight, bias = principal_projection(embedder.pool(*embedder.forward_tokens(pixels)), 16)
        embedder.embedding.weight.copy_(weight)
        embedder.embedding.bias.copy_(bias)
    directory = save_embedder(embedder, root / "export")
    onnx_export.export_onnx(embedder, directory, pixels)
    return embedder, directory, files


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


def test_the_quantized_model_loads_and_ranks(separated) -> None:
    embedder, directory, files = separated
    pixels = pixel_values(directory, files)
    with torch.no_grad():
        reference = embedder(pixels).pooler_output.numpy()
    others = reference @ reference.T
    np.fill_diagonal(others, -1.0)
    assert others.max() < 0.5  # the fixture's point: no two fp32 embeddings are close
    quantized = OnnxEmbedder(directory, quantized=True)(pixels).pooler_output.numpy()
    np.testing.assert_allclose(np.linalg.norm(quantized, axis=1), 1.0, atol=1e-3)
    # each 8-bit embedding finds its own image first among the fp32 (PyTorch) embeddings
    assert (np.argmax(quantized @ reference.T, axis=1) == np.arange(len(files))).all()


def test_the_8bit_file_has_7bit_weights_that_cannot_saturate_and_the_check_records_its_cpu(separated) -> None:
    import onnx
    from onnx import numpy_helper

    _, directory, _ = separated
    check = json.loads((directory / "onnx" / "export_check.json").read_text())
    assert check["int8_quantization"] == {
        "method": "quantize_static", "format": "QDQ", "per_channel": True, "activation_type": "QUInt8",
        "weight_type": "QInt8", "reduce_range": True, "weight_bits": 7, "calibrate_method": "MinMax",
    }  # fmt: skip
    assert check["check_cpu"] == cpu_features()
    # the file itself: every signed 8-bit weight lies in [-64, 64], so 2 x 255 x 64 fits a 16-bit sum
    graph = onnx.load(str(directory / "onnx" / "model_quantized.onnx")).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 5 and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
            "processor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma avx512f\n",
            {"avx2": True, "avx512f": False, "avx512_vnni": False, "avx_vnni": False, "cpu": "AMD EPYC 7B13"},
        ),
        (
            "model name\t: Intel Xeon 8480+\nflags\t: avx2 avx512f avx512_vnni avx_vnni amx_int8\n",
            {"avx2": True, "avx512f": True, "avx512_vnni": True, "avx_vnni": True, "cpu": "Intel Xeon 8480+"},
        ),
        (
            "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n",  # ARM: no flags line
            {"avx2": "unknown", "avx512f": "unknown", "avx512_vnni": "unknown", "avx_vnni": "unknown"},
        ),
    ],
)
def test_cpu_features_read_the_first_flags_line_and_say_unknown_without_one(tmp_path, text, expected) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    features = cpu_features(cpuinfo)
    assert {key: features[key] for key in expected} == expected
    assert has_vnni(features) == expected["avx512_vnni"]
    missing = cpu_features(tmp_path / "absent")  # not Linux
    assert [missing[k] for k in ("avx2", "avx512f", "avx512_vnni", "avx_vnni")] == ["unknown"] * 4


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
    assert "7-bit per-channel weights" in card and "(`reduce_range=True`)" in card
    assert "AVX2 " in card and "VNNI " in card and "The check\nran on" in card
    without = str(render_model_card(CrossMetricModelCardData.from_config(model.config)))
    assert "--onnx" in without and "onnxruntime.Inference" not in without


def test_an_8bit_file_that_misses_its_check_is_left_out_and_the_export_still_serves(
    tmp_path_factory, tmp_path, monkeypatch, capsys
) -> None:
    import _fault_helpers
    from _retrieval_fixtures import embed_reference
    from _serve_fixtures import Server, call, multipart

    run = _fault_helpers.trained_run(tmp_path_factory.getbasetemp() / "trained")
    monkeypatch.setattr(onnx_export, "MAX_RECALL_DROP", -1.0)  # forced: every 8-bit file now misses its check
    out = tmp_path / "export"
    capsys.readouterr()
    with _fault_helpers.one_thread():
        code = main(["export", "--checkpoint", str(run), "--output_dir", str(out), "--onnx", "--onnx_recall", "on"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "onnx" / "model.onnx").is_file() and not (out / "onnx" / "model_quantized.onnx").exists()
    check = json.loads((out / "onnx" / "export_check.json").read_text())
    assert check["fp32_max_difference"] <= 1e-4 and "int8_bytes" not in check
    assert "Recall@1" in check["int8_skipped"] and "fp32_recall_at_1" in check
    warnings = [line for line in captured.err.splitlines() if "model_quantized.onnx left out" in line]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING")
    for chatter in ("Optimize the ONNX graph", "pre-processing before quantization", "[torch.onnx]"):
        assert chatter not in captured.out + captured.err
    card = (out / "README.md").read_text()
    assert "**No 8-bit file:**" in card and check["int8_skipped"] in card
    assert OnnxEmbedder(out).onnx_file == "model.onnx"  # search --backend onnx and serve run the fp32 file

    server = Server(["--model", str(out), "--backend", "onnx"])
    try:
        query = sorted((tmp_path_factory.getbasetemp() / "trained" / "shapes").rglob("*.png"))[:2]
        answer = call(server.port, "POST", "/embed", *multipart([(q.name, q.read_bytes()) for q in query]))
        info = call(server.port, "GET", "/info").json()
    finally:
        server.stop()
    assert answer.status == 200 and info["backend"] == "onnx" and info["onnx_file"] == "model.onnx"
    np.testing.assert_allclose(answer.json(), embed_reference(out, query), atol=1e-4, rtol=0)
