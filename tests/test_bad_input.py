"""Bad input to ``crossmetric``: odd images are converted or skipped with a count and training goes on; a bad
configuration or file is refused before any training step with a message naming it and the fix, exit code 2, no
traceback, and nothing written.

The command line runs in this process through ``cli.main`` (what the ``crossmetric`` entry point calls), which
is where a traceback would escape; one case runs as a real subprocess to check the process boundary too.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import _fault_helpers
import _hub_server
import numpy as np
import pytest
from _fault_helpers import TINY_RUN, cli_args, cli_env, mounted_tmpfs, one_thread, run_cli, tiny_config, tree_digest
from _training_fixtures import make_shapes_folder
from PIL import Image
from test_bad_images import png_header_only, truncated_jpeg
from transformers import BertConfig, BertModel

from crossmetric import CrossMetricModel
from crossmetric.training.trainer import CrossMetricTrainer

hub_server = _hub_server.hub_server  # the fixture, bound here so that pytest finds it


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_folder(tmp_path_factory.mktemp("data") / "shapes")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run (checkpoints and export), shared with test_security.py; read-only."""
    return _fault_helpers.trained_run(tmp_path_factory.getbasetemp() / "trained")


# ------------------------------------------------------------------------------------------------ images
def test_training_skips_unreadable_images_with_a_count_and_converts_the_odd_ones(tmp_path, caplog) -> None:
    shapes = make_shapes_folder(tmp_path / "shapes")
    train_class, test_class = shapes / "class_01", shapes / "class_05"  # sorted split: classes 0-3 train, 4-7 test
    rng = np.random.default_rng(0)
    Image.new("CMYK", (30, 30), (0, 255, 255, 0)).save(train_class / "cmyk.jpg")
    Image.fromarray(rng.integers(0, 65535, (30, 30), dtype=np.uint16)).save(train_class / "deep.png")
    palette = Image.new("P", (30, 30), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(train_class / "palette.png", transparency=0)
    Image.new("L", (30, 30), 90).save(train_class / "gray.png")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(train_class / "dot.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), (0, 128, 0)).save(test_class / "rotated.jpg", exif=exif.tobytes())
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(test_class / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    bad = [
        truncated_jpeg(train_class / "truncated.jpg"),
        png_header_only(train_class / "bomb.png", 20000, 20000),
        test_class / "empty.jpg",
        test_class / "notes.jpg",
    ]
    bad[2].write_bytes(b"")
    bad[3].write_text("<html>404 not found</html>")

    config = tiny_config(dataset=str(shapes), output_dir=str(tmp_path / "out"), max_steps=2, export=False)
    with caplog.at_level(logging.WARNING), one_thread():
        trainer = CrossMetricTrainer(config)
        result = trainer.train()
    assert result.global_step == 2 and 0 <= result.metrics["recall@1"] <= 1  # training went on
    # load_dml_dataset drops them once, before the class split: 2 in train classes, 2 in test classes
    assert len([line for line in caplog.text.splitlines() if "Skipped 4 unreadable image(s)" in line]) == 1
    for path in bad:
        assert str(path) in caplog.text
    assert len(trainer.dataset["train"]) == 4 * 6 + 5 and len(trainer.dataset["test"]) == 4 * 6 + 2  # odd ones kept


# ------------------------------------------------------------------------------------------------ configurations
def folder_with_counts(root: Path, counts: list[int]) -> Path:
    for c, count in enumerate(counts):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (12, 12), (30 * c, 7 * i, 0)).save(root / f"class_{c}" / f"{i}.png")
    return root


CONFIG_CASES = {
    "batch size not P x K": (
        ["--batch_size", "10", "--samples_per_class", "4"], r"batch_size=10 is not P x K.*--batch_size 8"
    ),
    "K larger than every class, no replacement": (
        ["--batch_size", "16", "--samples_per_class", "8", "--small_classes", "drop"],
        r"samples_per_class=8 is larger than every class \(largest: 6 images\).*small_classes='replace'",
    ),
    "unknown timm backbone": (["--backbone", "resnet_does_not_exist"], r"'resnet_does_not_exist' is not a timm model"),
    "embedding width 0": (["--embedding_dim", "0"], r"embedding_dim=0 is invalid: it must be a positive integer"),
    "head width negative": (["--cia_dim", "-4"], r"cia_dim=-4 is invalid"),
    "head width not divisible by heads": (
        ["--cia_dim", "30", "--cia_heads", "4"], r"cia_dim=30 .*divisible by cia_heads=4"
    ),
    "negative levels": (["--cia_levels", "-1"], r"cia_levels=-1 is invalid: it must be an integer >= 0"),
    "learning rate 0": (["--learning_rate", "0"], r"--learning_rate=0.0 must be > 0"),
    "head learning rate negative": (["--head_learning_rate", "-0.001"], r"--head_learning_rate=-0.001 must be > 0"),
    "image column missing": (
        ["--image_column", "picture"], r"no image column 'picture'.*available columns.*image_column"
    ),
    "label column missing": (["--label_column", "species"], r"no label column 'species'.*label_column"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_configuration_is_refused_before_any_step(case: str, shapes, tmp_path, capsys) -> None:
    extra, message = CONFIG_CASES[case]
    output = tmp_path / "out"
    code, err = run_cli(capsys, "train", *cli_args({**TINY_RUN, "dataset": str(shapes), "output_dir": output}), *extra)
    assert code == 2
    assert re.search(message, err, flags=re.S), err
    assert not output.exists()  # nothing written: no run folder, log or checkpoint


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ([3, 3, 3, 3, 1, 1, 1, 1], r"Every class in split 'test' has fewer than 2 images"),
        ([12], r"has 1 class \(class_0\); DML needs at least 2 classes"),
    ],
    ids=["test split without pairs", "one class"],
)
def test_bad_dataset_is_refused_before_any_step(counts, message, tmp_path, capsys) -> None:
    data = folder_with_counts(tmp_path / "data", counts)
    output = tmp_path / "out"
    code, err = run_cli(capsys, "train", *cli_args({**TINY_RUN, "dataset": str(data), "output_dir": output}))
    assert code == 2 and re.search(message, err), err
    assert not output.exists()


def test_unwritable_output_directory_is_refused_before_any_work(shapes, tmp_path, capsys) -> None:
    in_the_way = tmp_path / "a-file"
    in_the_way.write_text("not a folder")
    args = cli_args({**TINY_RUN, "dataset": str(shapes)})
    code, err = run_cli(capsys, "train", *args, "--output_dir", str(in_the_way / "runs"))
    assert code == 2 and f"--output_dir: cannot write to {in_the_way / 'runs' / 'run'}" in err
    assert "choose a writable --output_dir" in err and in_the_way.read_text() == "not a folder"

    with mounted_tmpfs(tmp_path / "read-only", size="1m", options="ro") as read_only:  # root ignores chmod
        code, err = run_cli(capsys, "train", *args, "--output_dir", str(read_only / "runs"))
        assert code == 2 and "Read-only file system" in err and list(read_only.iterdir()) == []


def test_bad_configuration_in_a_real_process_exits_2_without_traceback(shapes, tmp_path) -> None:
    argv = [sys.executable, "-m", "crossmetric.cli", "train", *cli_args({**TINY_RUN, "dataset": str(shapes)})]
    argv += ["--output_dir", str(tmp_path / "out"), "--batch_size", "10", "--samples_per_class", "4"]
    result = subprocess.run(argv, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "batch_size=10 is not P x K" in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ files
def bert_folder(root: Path) -> Path:
    """A real transformers model of another type, saved with safetensors."""
    config = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8, vocab_size=20)
    BertModel(config).save_pretrained(root)
    return root


def copy_of(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def resume_args(shapes: Path, run: Path) -> list[str]:
    fields = {**TINY_RUN, "dataset": str(shapes), "output_dir": str(run.parent), "max_steps": 4, "save_steps": 1}
    return cli_args({**fields, "eval_every_epochs": 0, "run_name": run.name})


def test_checkpoint_of_another_model_or_truncated_is_refused(trained, shapes, tmp_path, capsys) -> None:
    checkpoint = trained / "checkpoints" / "checkpoint-2"
    cases = {}
    other = copy_of(checkpoint, tmp_path / "other" / "run" / "checkpoints" / "checkpoint-2")
    shutil.copy(bert_folder(tmp_path / "bert") / "model.safetensors", other / "model.safetensors")
    cases["another model type"] = other
    cut = copy_of(checkpoint, tmp_path / "cut" / "run" / "checkpoints" / "checkpoint-2")
    truncate(cut / "model.safetensors")
    cases["truncated"] = cut
    for case, folder in cases.items():
        run = folder.parents[1]
        before = tree_digest(run)
        code, err = run_cli(capsys, "train", *resume_args(shapes, run), "--resume_from_checkpoint", str(folder))
        assert code == 2, case
        assert f"cannot load {folder}" in err and "Resume from another checkpoint" in err, err
        assert tree_digest(run) == before, case  # nothing written or changed
    # the same checkpoint resumed with another head configuration
    args = [*resume_args(shapes, trained), "--cia_levels", "0", "--output_dir", str(tmp_path / "elsewhere")]
    code, err = run_cli(capsys, "train", *args, "--resume_from_checkpoint", str(checkpoint))
    assert code == 2 and "Unexpected key(s)" in err and "head." in err

    shutil.copy(trained / "checkpoints" / "training_config.yaml", cut.parent)  # export rebuilds the model from it
    code, err = run_cli(capsys, "export", "--checkpoint", str(cut), "--output_dir", str(tmp_path / "export"))
    assert code == 2 and "model.safetensors cannot be read" in err and "truncated or damaged" in err
    assert not (tmp_path / "export").exists()


def test_export_of_another_model_type_or_truncated_or_mistyped_is_refused(trained, shapes, tmp_path, capsys) -> None:
    export = trained / "model"
    cut = copy_of(export, tmp_path / "cut")
    truncate(cut / "model.safetensors")
    mistyped = copy_of(export, tmp_path / "mistyped")
    config = json.loads((mistyped / "config.json").read_text())
    (mistyped / "config.json").write_text(json.dumps({**config, "embedding_dim": "sixteen"}))
    cases = {
        bert_folder(tmp_path / "bert"): r"config.json has model_type='bert'.*Pass a folder written by crossmetric",
        cut: r"safetensors weights cannot be read .*truncated or damaged",
        mistyped: r"CrossMetricConfig.embedding_dim='sixteen' is invalid: it must be a positive integer",
    }
    for folder, message in cases.items():
        args = cli_args({**TINY_RUN, "dataset": str(shapes), "output_dir": str(tmp_path / "out")})
        code, err = run_cli(capsys, "train", *args, "--model_name_or_path", str(folder))
        assert code == 2 and re.search(message, err), err
        assert str(folder) in err
        assert not (tmp_path / "out").exists()


def test_unknown_config_fields_are_named_in_a_warning(trained, tmp_path, caplog) -> None:
    folder = copy_of(trained / "model", tmp_path / "typo")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "embeding_dim": 64}))
    with caplog.at_level(logging.WARNING):
        model = CrossMetricModel.from_pretrained(folder)
    assert "fields that CrossMetricConfig does not know and ignores: ['embeding_dim']" in caplog.text
    assert model.config.embedding_dim == config["embedding_dim"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        CrossMetricModel.from_pretrained(trained / "model")
    assert "does not know" not in caplog.text  # a normal export has no unknown field


def test_push_while_the_hub_is_offline_says_so(trained, hub_server, monkeypatch, capsys) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli(capsys, "push", "--model", str(trained / "model"), "--repo-id", "tester/offline")
    assert code == 1 and "offline mode is enabled" in err and "HF_HUB_OFFLINE" in err, err
    assert hub_server.requests == []
