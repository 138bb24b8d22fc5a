"""Export → push to a Hub over real HTTP → AutoModel.from_pretrained("ns/name") gives identical embeddings.

Both routes: the library one (``import crossmetric`` registers the classes) and ``trust_remote_code`` in a process
where crossmetric cannot be imported (the exported folder carries the modeling files). Also the model's own
``push_to_hub``.
"""

from __future__ import annotations

import _hub_server
import pytest
import torch
import transformers.utils.hub
from _remote_code import embed_with_remote_code
from transformers import AutoModel

from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning, CrossMetricModel
from crossmetric.hub.push import push_to_hub_folder

hub_server = _hub_server.hub_server


@pytest.fixture(autouse=True)
def _fresh_transformers_hub_client(monkeypatch) -> None:
    """transformers keeps one HfApi per process, bound to the endpoint of its first use; each test has its own
    server, so each test starts without it (a real process has one endpoint)."""
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)


def tiny_export(tmp_path):
    torch.manual_seed(0)
    config = CrossMetricConfig(backbone="test_resnet", embedding_dim=16, image_size=32, cia_dim=16, cia_heads=2)
    model = CrossMetricForMetricLearning(config).eval()
    return model, model.save_embedder(tmp_path / "export")


def test_push_then_automodel_from_the_hub_gives_identical_embeddings(hub_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    model, export = tiny_export(tmp_path)
    push_to_hub_folder(export, "tester/tiny-embedder", endpoint=hub_server.url)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.embedder(pixels).pooler_output
        reloaded = AutoModel.from_pretrained("tester/tiny-embedder").eval()
        assert isinstance(reloaded, CrossMetricModel)
        torch.testing.assert_close(reloaded(pixels).pooler_output, expected, atol=1e-6, rtol=0)

    got = embed_with_remote_code("tester/tiny-embedder", pixels, tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert not hub_server.token_exposures()


def test_the_models_own_push_to_hub_round_trips(hub_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    model, _ = tiny_export(tmp_path)
    model.embedder.push_to_hub("tester/pushed-directly")
    reloaded = CrossMetricModel.from_pretrained("tester/pushed-directly").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).pooler_output, model.embedder(pixels).pooler_output)
