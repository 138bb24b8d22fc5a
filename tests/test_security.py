"""Untrusted files and names: pickled code is never run, no load path needs remote code, labels / ids / run and
file names cannot write outside the output folder, and a token from the environment never reaches a file or log.

What loads what (checked here, reported in the closing note of issue 8):
- models: ``from_pretrained`` reads safetensors only; a ``pytorch_model.bin`` is refused unless
  ``use_safetensors=False`` is passed, and even then transformers unpickles with ``weights_only=True``;
- training checkpoints: accelerate reads ``model.safetensors``; ``optimizer.bin``, ``scheduler.bin`` and
  ``random_states_0.pkl`` are pickles that it reads with ``torch.load(weights_only=True)`` (tensors and a few
  numpy types only). Accelerate ignores an RNG file that fails to load; crossmetric reads it first, so a refused
  file stops the resume instead of silently changing the random stream;
- embedding indexes: safetensors, JSON and ``faiss.read_index``: no pickle at all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import _fault_helpers
import _hub_server
import numpy as np
import pytest
import torch
from _fault_helpers import TINY_RUN, cli_args, cli_env, run_cli, tree_digest
from _hub_server import HubServer
from _training_fixtures import make_shapes_folder
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel, pipeline

from crossmetric import CrossMetricForMetricLearning, CrossMetricModel
from crossmetric.modeling.modeling_crossmetric import save_embedder

hub_server = _hub_server.hub_server  # the fixture, bound here so that pytest finds it


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run (checkpoints and export), shared with test_bad_input.py; read-only."""
    return _fault_helpers.trained_run(tmp_path_factory.getbasetemp() / "trained")


class Payload:
    """Unpickling this creates ``marker``: proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# ------------------------------------------------------------------------------------------------ pickles
@pytest.mark.parametrize("file", ["optimizer.bin", "random_states_0.pkl"])
def test_a_checkpoint_with_pickled_code_is_refused_and_the_code_never_runs(trained, tmp_path, capsys, file) -> None:
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "checkpoint-2"
    shutil.copytree(trained / "checkpoints" / "checkpoint-2", checkpoint)
    marker = tmp_path / "payload-ran"
    torch.save({"state": Payload(marker)}, checkpoint / file)
    shapes = make_shapes_folder(tmp_path / "shapes")
    args = cli_args({**TINY_RUN, "dataset": str(shapes), "output_dir": str(tmp_path), "max_steps": 4})
    code, err = run_cli(capsys, "train", *args, "--resume_from_checkpoint", "latest")
    assert code == 2 and f"cannot load {checkpoint}" in err and "refused for safety" in err, err
    assert "Unsupported global" in err  # torch's weights_only unpickler named what it refused
    assert not marker.exists()


def test_pickle_model_weights_never_run_code_even_when_allowed(trained, tmp_path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(trained / "model" / "config.json", folder)
    marker = tmp_path / "payload-ran"
    torch.save({"embedding.weight": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(OSError, match="only safetensors.*use_safetensors=False"):
        CrossMetricModel.from_pretrained(folder)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported global"):
        CrossMetricModel.from_pretrained(folder, use_safetensors=False)  # the explicit flag still unpickles safely
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ remote code
def test_no_load_path_needs_remote_code_with_the_package_installed(trained) -> None:
    export = trained / "model"
    config = AutoConfig.from_pretrained(export, trust_remote_code=False)
    model = AutoModel.from_pretrained(export, trust_remote_code=False)
    processor = AutoImageProcessor.from_pretrained(export, trust_remote_code=False)
    extractor = pipeline("image-feature-extraction", model=str(export), trust_remote_code=False, pool=True)
    for loaded in (config, model, extractor.model, CrossMetricForMetricLearning.from_pretrained(export)):
        assert type(loaded).__module__.startswith("crossmetric.modeling."), type(loaded)
    assert not type(processor).__module__.startswith("transformers_modules")
    image = Image.new("RGB", (40, 40), (128, 60, 30))
    assert np.asarray(extractor(image)).shape[-1] == model.config.embedding_dim


# ------------------------------------------------------------------------------------------------ paths
@pytest.mark.parametrize("run_name", ["../escaped", "/tmp/crossmetric-escaped-run", "a\x00b", "x/../../escaped"])
def test_run_names_cannot_leave_the_output_directory(run_name, tmp_path, capsys) -> None:
    output = tmp_path / "outputs" / "nested"
    shapes = make_shapes_folder(tmp_path / "shapes", num_classes=4, per_class=2)
    args = cli_args({**TINY_RUN, "dataset": str(shapes), "output_dir": str(output)})
    code, err = run_cli(capsys, "train", *args, "--run_name", run_name)
    assert code == 2 and "must stay inside --output_dir" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # nothing written anywhere
    assert not Path("/tmp/crossmetric-escaped-run").exists()


@pytest.mark.parametrize("name", ["../escaped.txt", "sub/dir.txt", "ABSOLUTE", "a\x00b.txt", "", ".", ".."])
def test_export_extra_file_names_cannot_leave_the_export(trained, tmp_path, name) -> None:
    name = str(tmp_path / "escaped.txt") if name == "ABSOLUTE" else name
    embedder = CrossMetricModel.from_pretrained(trained / "model")
    target = tmp_path / "exports" / "model"
    with pytest.raises(ValueError):
        save_embedder(embedder, target, extra_files={"README.md": "card", name: "outside?"})
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("*")] == [Path("exports")]  # nor staging left


def test_index_ids_labels_and_paths_are_data_never_file_names(tmp_path) -> None:
    from crossmetric.retrieval.index import EmbeddingIndex

    hostile = ["../../escaped", "/tmp/crossmetric-escaped-id", "a\x00b", "..", "sub/../../x"]
    vectors = np.random.default_rng(0).standard_normal((len(hostile), 8)).astype(np.float32)
    index = EmbeddingIndex(vectors, ids=hostile, labels=hostile, paths=hostile)
    folder = index.save(tmp_path / "out" / "index")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == [
        Path("out"), Path("out/index"), *(Path("out/index") / n for n in sorted(
            ["idhash-000001.npy", "index-000001.faiss", "items-000001.arrow", "metadata.json"]))  # format 2
    ]  # fmt: skip
    assert EmbeddingIndex.load(folder).ids == hostile
    assert not Path("/tmp/crossmetric-escaped-id").exists()
    for subfolder in ("../..", "/etc", "a/../../b", "a\\b"):
        with pytest.raises(ValueError, match="must be a relative folder path"):
            EmbeddingIndex.from_pretrained("someone/model", subfolder=subfolder)


# ------------------------------------------------------------------------------------------------ tokens
def test_crossmetric_push_never_writes_or_prints_the_token(trained, hub_server: HubServer, tmp_path) -> None:
    """``crossmetric push`` as a real process, token in HF_TOKEN only: a push, then a push the Hub refuses."""
    model = tmp_path / "model"
    shutil.copytree(trained / "model", model)
    before = tree_digest(model)
    env = cli_env(HF_TOKEN=hub_server.token, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="0")
    outputs = []
    for repo, code in (("tester/pushed", 0), ("tester/refused", 1)):
        if code:
            hub_server.inject_fault(f"/api/models/{repo}/commit", status=500, times=5)
        argv = [sys.executable, "-m", "crossmetric.cli", "push", "--model", str(model), "--repo-id", repo]
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == code, result.stderr[-2000:]
        outputs += [result.stdout, result.stderr]
    assert "HTTP 500" in outputs[-1] and "tester/pushed/commit/" in outputs[0]
    token = hub_server.token
    assert [text for text in outputs if token in text] == []
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 8  # the export, the Hub's stored copy, any cache
    assert [str(p) for p in written if token.encode() in p.read_bytes()] == []
    assert hub_server.token_exposures() == []  # only ever sent as the Authorization header
    assert tree_digest(model) == before
    assert json.loads(hub_server.repo_files("tester/pushed")["config.json"]) == json.loads(
        (model / "config.json").read_text()
    )
