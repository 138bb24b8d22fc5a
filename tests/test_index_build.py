"""``crossmetric index build`` survives being killed: shards with completion markers, resumed by the same command.

- A real build subprocess is SIGKILLed part way (in the middle of a shard, after two shards were marked done); the
  same command run again embeds only the shards left and gives the index an uninterrupted build gives: identical ids,
  embeddings equal to 1e-6.
- A rerun with other inputs (an image changed) does not reuse the shards of the first run.
- Under ``accelerate launch`` with 2 processes, each process embeds whole shards (``i % 2``), continuing the shards a
  interrupted single-process build left, and the index equals the single-process one.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _fault_helpers import run_cli, start_cli
from _retrieval_fixtures import export_tiny_model, make_class_folder, write_image

from crossmetric.retrieval.build import build_index_sharded
from crossmetric.retrieval.index import EmbeddingIndex
from crossmetric.retrieval.shards import work_root

SHARD = ["--shard_size", "4", "--batch_size", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, 25 image files (one unreadable: it is skipped, in shard 1) and the uninterrupted build."""
    base = tmp_path_factory.mktemp("build")
    model = export_tiny_model(base / "model")
    images = make_class_folder(base / "images", classes=4, per_class=6, broken=True)
    reference = base / "reference"
    build_index_sharded(str(model), str(images), reference, shard_size=4, batch_size=2, device="cpu", progress=False)
    return {"base": base, "model": model, "images": images, "reference": reference}


def _markers(output: Path) -> list[str]:
    return sorted(p.name for p in work_root(output).rglob("*.done.json"))


def _assert_same_index(built: Path, reference: Path) -> None:
    ours, theirs = EmbeddingIndex.load(built), EmbeddingIndex.load(reference)
    assert len(ours) == 24 and ours.ids == theirs.ids
    assert ours.labels == theirs.labels and ours.paths == theirs.paths
    np.testing.assert_allclose(ours.embeddings, theirs.embeddings, atol=1e-6, rtol=0)


def test_a_killed_build_resumes_from_the_first_unfinished_shard(gallery: dict[str, Path], capsys, caplog) -> None:
    output = gallery["base"] / "killed" / "index"
    argv = ["build", "--model", str(gallery["model"]), "--images", str(gallery["images"]), "--output_dir", str(output)]
    # batches of 2, shards of 4: batch 5 is the first of shard 2, after shards 0 and 1 were marked done
    build = start_cli("index", [*argv, *SHARD, "--progress", "false"], CROSSMETRIC_TEST_PAUSE="embedding:5:600")
    build.wait_for("CROSSMETRIC_TEST_PAUSE embedding #5")
    assert _markers(output) == ["shard-000000.done.json", "shard-000001.done.json"]
    build.kill()
    assert not output.exists()  # nothing half-written where the index goes

    with caplog.at_level(logging.INFO, logger="crossmetric"):
        code, err = run_cli(capsys, "index", *argv, *SHARD, "--no-progress")
    assert code == 0, err
    log = caplog.text
    assert "Resuming the build" in log and "2 of 7 shards done" in log
    assert re.search(r"Embedded 17 images", log), log  # 25 images - the 8 of the two finished shards
    _assert_same_index(output, gallery["reference"])
    assert not work_root(output).exists()  # the shards are removed once the index is saved


def test_other_inputs_do_not_reuse_stale_shards(gallery: dict[str, Path], tmp_path: Path) -> None:
    images = tmp_path / "images"
    make_class_folder(images, classes=2, per_class=4)
    output = tmp_path / "index"
    done: list[int] = []

    def stop_after_one(shard: int) -> None:
        done.append(shard)
        raise KeyboardInterrupt  # as a user's Ctrl-C after the first shard

    options = {"shard_size": 3, "batch_size": 3, "device": "cpu", "progress": False}
    with pytest.raises(KeyboardInterrupt):
        build_index_sharded(str(gallery["model"]), str(images), output, on_shard=stop_after_one, **options)
    assert done == [0] and len(_markers(output)) == 1
    first = next(work_root(output).iterdir()).name

    write_image(images / "class_1" / "3.png", seed=999)  # the gallery changed: its fingerprint with it
    again: list[tuple[int, list[str]]] = []
    record = lambda shard: again.append((shard, [p.name for p in work_root(output).iterdir()]))  # noqa: E731
    index = build_index_sharded(str(gallery["model"]), str(images), output, on_shard=record, **options)
    assert [shard for shard, _ in again] == [0, 1, 2]  # every shard embedded afresh
    folders = again[0][1]
    assert len(folders) == 1 and folders != [first]  # the stale shards were removed, not reused
    assert len(index) == 8 and not work_root(output).exists()


def test_shard_size_is_checked_before_any_work(gallery: dict[str, Path], capsys) -> None:
    argv = ["build", "--model", str(gallery["model"]), "--images", str(gallery["images"])]
    code, err = run_cli(capsys, "index", *argv, "--output_dir", str(gallery["base"] / "x"), "--shard_size", "0")
    assert code == 2 and "--shard_size must be >= 1, got 0" in err
    assert not work_root(gallery["base"] / "x").exists()


@pytest.mark.slow
def test_two_processes_take_whole_shards_and_continue_an_interrupted_build(gallery: dict[str, Path]) -> None:
    """``accelerate launch`` with 2 CPU processes continues the shards an interrupted single-process build left (the
    resume does not depend on the number of processes), each process embedding the shards ``i % 2 == rank``."""
    output = gallery["base"] / "two" / "index"
    argv = ["build", "--model", str(gallery["model"]), "--images", str(gallery["images"]), "--output_dir", str(output)]

    def stop(shard: int) -> None:
        raise KeyboardInterrupt  # after shard 0 (the kill itself is the test above)

    with pytest.raises(KeyboardInterrupt):
        build_index_sharded(str(gallery["model"]), str(gallery["images"]), output, shard_size=4, batch_size=2,
                            device="cpu", progress=False, on_shard=stop)  # fmt: skip
    assert _markers(output) == ["shard-000000.done.json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
        "-m", "crossmetric.cli", "index", *argv, *SHARD[:4], "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # 7 shards, shard 0 done: process 0 embeds shards 2, 4, 6 (4 + 4 + 1 images), process 1 shards 1, 3, 5 (4 each)
    assert "Embedded 9 images" in done.stderr and "(process 0/2)" in done.stderr, done.stderr[-3000:]
    assert "Embedded 12 images" in done.stderr and "(process 1/2)" in done.stderr, done.stderr[-3000:]
    _assert_same_index(output, gallery["reference"])


def test_ivfpq_flags_reach_the_index_and_belong_to_ivfpq_only(gallery: dict[str, Path], tmp_path: Path, capsys) -> None:
    """``--kind ivfpq --max_memory --refine`` (issue 26's flags) build a working ivfpq index; the same flags with
    another kind, or a budget that is not a size, are refused before any work."""
    argv = ["build", "--model", str(gallery["model"]), "--images", str(gallery["images"]), *SHARD]
    output = tmp_path / "pq"
    code, err = run_cli(capsys, "index", *argv, "--output_dir", str(output), "--kind", "ivfpq", "--max_memory", "1M",
                        "--refine", "4", "--no-progress")  # fmt: skip
    assert code == 0, err
    index = EmbeddingIndex.load(output)
    assert index.kind == "ivfpq" and len(index) == 24
    assert index.params["refine"] == 4 and index.params["max_memory"] == 1024**2
    reference = EmbeddingIndex.load(gallery["reference"])
    probe = reference.embeddings[[3, 17]]
    assert [hits[0]["id"] for hits in index.search(probe, k=1)] == [reference.ids[3], reference.ids[17]]
    for extra, message in (
        (["--kind", "hnsw", "--refine", "4"], "--max_memory and --refine are settings of --kind ivfpq"),
        (["--kind", "ivfpq", "--max_memory", "lots"], "max_memory 'lots' is not a memory size"),
        (["--kind", "ivfpq", "--refine", "0"], "--refine must be >= 1"),
    ):
        code, err = run_cli(capsys, "index", *argv, "--output_dir", str(tmp_path / "refused"), *extra)
        assert code == 2 and message in err, err
    assert not (tmp_path / "refused").exists() and not work_root(tmp_path / "refused").exists()


def test_the_progress_bar_shows_images_per_second_and_time_left(
    gallery: dict[str, Path], tmp_path: Path, capsys
) -> None:
    """One bar over the whole build (not one per shard), counted in images, with tqdm's rate and remaining time."""
    argv = ["build", "--model", str(gallery["model"]), "--images", str(gallery["images"]), *SHARD]
    code, err = run_cli(capsys, "index", *argv, "--output_dir", str(tmp_path / "index"), "--progress", "true")
    assert code == 0, err
    bars = re.findall(r"Embedding images:\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[[0-9:]+<[0-9:?]+,\s*[0-9.?]+img/s\]", err)
    assert bars and {total for _, total in bars} == {"25"} and ("25", "25") in bars, err[-2000:]
