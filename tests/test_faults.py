"""Faults, injected for real: SIGKILL at three points of a training run, an export killed half way, a Hub that
fails or drops the connection, and a disk that fills up while a checkpoint is written.

Pause points (``CROSSMETRIC_TEST_PAUSE``, see crossmetric/utils/fault_points.py) make the kills land exactly
where they should; the process is then killed with SIGKILL, which it cannot catch or clean up after.
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
from pathlib import Path

import _hub_server
import numpy as np
import pytest
import torch
from _fault_helpers import (
    TINY_RUN,
    Process,
    cli_args,
    cli_env,
    mounted_tmpfs,
    one_thread,
    start_cli,
    tiny_config,
    tree_digest,
)
from _hub_server import HubServer
from _training_fixtures import make_shapes_folder
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file

from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning, CrossMetricModel
from crossmetric.cli import main as cli
from crossmetric.hub.push import HubPushError, push_to_hub_folder
from crossmetric.inference.run_folder import complete_checkpoints
from crossmetric.modeling import modeling_crossmetric
from crossmetric.training.checkpointing import resolve_checkpoint
from crossmetric.training.trainer import CrossMetricTrainer

hub_server = _hub_server.hub_server  # the fixture, bound here so that pytest finds it
REPO = "tester/faults"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_folder(tmp_path_factory.mktemp("data") / "shapes")


def log_records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ training kills
def test_sigkill_in_a_checkpoint_write_in_evaluation_and_mid_epoch_then_resume_gives_the_uninterrupted_run(
    shapes, tmp_path
) -> None:
    """One run killed three times, resumed with ``latest`` after each kill, against a run never interrupted.

    3 batches per epoch, 3 epochs, a checkpoint every 2 steps and at every epoch end, evaluation at every epoch end.
    """
    # eval_split test: the tiny folder's 4 train classes are too few to carve a validation split from
    fields = {"dataset": str(shapes), "num_epochs": 3, "save_steps": 2, "save_total_limit": 20, "export": False,
              "eval_every_epochs": 1, "eval_split": "test"}  # fmt: skip
    interrupted = tmp_path / "interrupted"
    run, checkpoints = interrupted / "run", interrupted / "run" / "checkpoints"
    args = cli_args({**TINY_RUN, **fields, "output_dir": str(interrupted)})

    # 1. Killed while writing checkpoint-3 (its 2nd checkpoint write; checkpoint-2 is complete).
    first = start_cli("train", args, CROSSMETRIC_TEST_PAUSE="checkpoint_write:2:600")
    with one_thread():  # the reference run, in this process, while the subprocess starts
        reference = CrossMetricTrainer(tiny_config(**fields, output_dir=str(tmp_path / "reference"))).train()
    first.wait_for("CROSSMETRIC_TEST_PAUSE checkpoint_write #2")
    first.kill()
    partial = checkpoints / ".checkpoint-3.partial"
    assert (partial / "model.safetensors").is_file() and not (partial / "COMPLETE").exists()
    shutil.copytree(partial, checkpoints / "checkpoint-7")  # named like a checkpoint, but never completed
    assert complete_checkpoints(run) == [checkpoints / "checkpoint-2"]
    assert resolve_checkpoint(run, "latest") == checkpoints / "checkpoint-2"
    with pytest.raises(ValueError, match="checkpoint-7 is incomplete"):
        resolve_checkpoint(run, str(checkpoints / "checkpoint-7"))

    # 2. Resumed; killed while evaluating at the end of epoch 2 (checkpoint-6 was written just before).
    resume = [*args, "--resume_from_checkpoint", "latest"]
    second = start_cli("train", resume, CROSSMETRIC_TEST_PAUSE="embedding:2:600")
    second.wait_for("CROSSMETRIC_TEST_PAUSE embedding #2")
    second.kill()
    assert "Resumed from" in second.output and "zero-shot" not in second.output
    assert resolve_checkpoint(run, "latest") == checkpoints / "checkpoint-6"

    # 3. Resumed; killed in the middle of epoch 3, after step 8 (and its checkpoint), before step 9. The resumed run
    # starts at the end of epoch 2 (checkpoint-6), so its optimizer steps are 7 (#1), 8 (#2) and 9.
    third = start_cli("train", resume, CROSSMETRIC_TEST_PAUSE="train_step:2:600")
    third.wait_for("CROSSMETRIC_TEST_PAUSE train_step #2")
    third.kill()
    assert resolve_checkpoint(run, "latest") == checkpoints / "checkpoint-8"
    assert [r["step"] for r in log_records(run) if "loss" in r][-1] == 8

    # 4. Resumed to the end, in this process.
    with one_thread():
        resumed = CrossMetricTrainer(
            tiny_config(**fields, output_dir=str(interrupted), resume_from_checkpoint="latest")
        ).train()

    assert resumed.global_step == reference.global_step == 9
    final, expected = (
        load_file(checkpoints / "checkpoint-9" / "model.safetensors"),
        load_file(tmp_path / "reference" / "run" / "checkpoints" / "checkpoint-9" / "model.safetensors"),
    )
    assert final.keys() == expected.keys()
    assert [key for key in final if not torch.equal(final[key], expected[key])] == []
    assert resumed.metrics == reference.metrics and resumed.best_metrics == reference.best_metrics
    assert log_records(run) == log_records(tmp_path / "reference" / "run")  # every loss and evaluation, in order
    assert [r["step"] for r in log_records(run) if "eval" in r] == [0, 3, 6, 9]  # the start is a candidate too
    assert complete_checkpoints(run)[-1] == checkpoints / "checkpoint-9"
    assert not (checkpoints / "checkpoint-7" / "COMPLETE").exists()


# ------------------------------------------------------------------------------------------------ export kills
def tiny_model(seed: int) -> CrossMetricForMetricLearning:
    torch.manual_seed(seed)
    config = CrossMetricConfig(backbone="test_resnet", embedding_dim=16, image_size=32, cia_dim=16, cia_heads=2)
    return CrossMetricForMetricLearning(config).eval()


def embed(directory: Path) -> torch.Tensor:
    with torch.no_grad():
        return CrossMetricModel.from_pretrained(directory).eval()(torch.ones(1, 3, 32, 32)).pooler_output


@pytest.fixture
def previous_export(tmp_path) -> tuple[Path, dict[str, str], torch.Tensor]:
    target = tiny_model(seed=0).save_embedder(tmp_path / "model", extra_files={"metrics.json": "{}"})
    return target, tree_digest(target), embed(target)


def assert_unchanged(previous: tuple[Path, dict[str, str], torch.Tensor]) -> None:
    target, digest, embedding = previous
    assert tree_digest(target) == digest
    torch.testing.assert_close(embed(target), embedding, rtol=0, atol=0)


def test_export_failing_half_way_leaves_the_previous_export_unchanged(previous_export, monkeypatch) -> None:
    target = previous_export[0]
    newer = tiny_model(seed=1)

    def processor_save_fails(config):  # the weights are already written into the staging folder by now
        raise OSError(errno.EIO, "Input/output error (injected)")

    with monkeypatch.context() as patch:
        patch.setattr(modeling_crossmetric, "build_image_processor", processor_save_fails)
        with pytest.raises(OSError, match="injected"):
            newer.save_embedder(target)
    assert_unchanged(previous_export)
    with pytest.raises(ValueError, match="plain file name"):  # fails after weights and processor are staged
        newer.save_embedder(target, extra_files={"README.md": "card", "../metrics.json": "{}"})
    assert_unchanged(previous_export)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]  # no staging folder left behind


def test_export_killed_half_way_leaves_the_previous_export_unchanged(previous_export) -> None:
    target = previous_export[0]
    script = f"""
import time, torch
from crossmetric import CrossMetricConfig, CrossMetricForMetricLearning
from crossmetric.modeling import modeling_crossmetric as modeling
real = modeling.build_image_processor
def paused(config):
    print("CROSSMETRIC_TEST_PAUSE weights written", flush=True)
    time.sleep(600)
    return real(config)
modeling.build_image_processor = paused
torch.manual_seed(1)
config = CrossMetricConfig(backbone="test_resnet", embedding_dim=16, image_size=32, cia_dim=16, cia_heads=2)
CrossMetricForMetricLearning(config).save_embedder({str(target)!r})
"""
    process = Process([sys.executable, "-c", script], cli_env())
    process.wait_for("CROSSMETRIC_TEST_PAUSE weights written")
    process.kill()
    staged = [p for p in target.parent.iterdir() if p.name.startswith(".model.partial-")]
    assert len(staged) == 1 and (staged[0] / "model.safetensors").is_file()  # killed with the export half done
    assert_unchanged(previous_export)
    tiny_model(seed=1).save_embedder(target)  # the leftover staging folder does not get in the way
    assert not torch.equal(embed(target), previous_export[2])


# ------------------------------------------------------------------------------------------------ Hub failures
@pytest.fixture
def export_folder(tmp_path) -> Path:
    folder = tmp_path / "export"
    folder.mkdir()
    rng = np.random.default_rng(0)
    save_numpy({"w": rng.standard_normal((64, 8)).astype(np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "crossmetric"}))
    return folder


@pytest.mark.parametrize("status", [500, None], ids=["http-500", "dropped-connection"])
def test_push_retries_a_failed_upload_of_the_weights_and_succeeds(
    hub_server: HubServer, export_folder, status, monkeypatch
):
    """huggingface_hub retries LFS uploads (5xx and dropped connections) with backoff: the push goes through."""
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    before = tree_digest(export_folder)
    hub_server.inject_fault("/_lfs_upload/", status=status, times=1, method="PUT")
    commit = push_to_hub_folder(export_folder, REPO)
    assert len(hub_server.requests_to(r"^/_lfs_upload/", "PUT")) == 2  # the failed attempt and its retry
    weights = (export_folder / "model.safetensors").read_bytes()
    assert hub_server.repo_files(REPO, commit.oid)["model.safetensors"] == weights
    assert tree_digest(export_folder) == before


@pytest.mark.parametrize("status", [500, None], ids=["http-500", "dropped-connection"])
def test_push_whose_commit_fails_raises_a_clear_error_and_changes_nothing(
    hub_server: HubServer, export_folder, status, monkeypatch
):
    """The commit call is not retried by huggingface_hub (it is not idempotent): one request, a HubPushError."""
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    before = tree_digest(export_folder)
    hub_server.inject_fault(f"/api/models/{REPO}/commit", status=status, times=10)
    with pytest.raises(HubPushError, match=f"{REPO}.*failed") as info:
        push_to_hub_folder(export_folder, REPO)
    assert info.value.status == status
    assert len(hub_server.requests_to(rf"^/api/models/{REPO}/commit/", "POST")) == 1
    assert tree_digest(export_folder) == before
    assert set(hub_server.repo_files(REPO)) == {".gitattributes"}  # nothing half committed


# ------------------------------------------------------------------------------------------------ disk full
# 3 steps, a checkpoint after each (4.6 MB: weights and Adam state), only the newest kept.
DISK_RUN = {"max_steps": 3, "save_steps": 1, "save_total_limit": 1, "export": False, "eval_every_epochs": 0}


def checkpoint_digests(run: Path) -> dict[str, dict[str, str]]:
    return {p.name: tree_digest(p) for p in complete_checkpoints(run)}


def run_until_disk_full(shapes: Path, output_dir: Path, fill, monkeypatch, capsys) -> tuple[str, dict]:
    """``crossmetric train`` (in this process) whose 2nd checkpoint write meets a full disk (``fill`` makes it so,
    then the real write runs); returns stderr and the digests of the complete checkpoints just before."""
    from accelerate import Accelerator

    real_save_state, calls, before = Accelerator.save_state, [], {}

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            before.update(checkpoint_digests(Path(output_dir).parents[1]))
            fill(Path(output_dir))
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    fields = {**TINY_RUN, **DISK_RUN, "dataset": str(shapes), "output_dir": str(output_dir)}
    with one_thread():
        code = cli.main(["train", *cli_args(fields)])
    err = capsys.readouterr().err
    assert code == 1, err
    return err, before


def test_disk_full_on_a_real_tmpfs_during_a_checkpoint(shapes, tmp_path, monkeypatch, capsys) -> None:
    with mounted_tmpfs(tmp_path / "small-disk", size="12m") as disk:

        def fill(staging: Path) -> None:  # leave 64 KiB free: the checkpoint (4.6 MB) cannot fit
            free = shutil.disk_usage(disk).free
            with open(disk / "ballast", "wb") as ballast:
                ballast.write(b"\0" * (free - (64 << 10)))

        err, before = run_until_disk_full(shapes, disk / "out", fill, monkeypatch, capsys)
        run = disk / "out" / "run"
        assert "No space left on the device while writing checkpoint-2" in err and "Traceback" not in err
        assert f"the last complete one ({run / 'checkpoints' / 'checkpoint-1'}) is intact" in err
        assert list(before) == ["checkpoint-1"] and checkpoint_digests(run) == before
        assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []  # no partial left

        (disk / "ballast").unlink()  # space freed: the run resumes from the intact checkpoint and finishes
        monkeypatch.undo()
        with one_thread():
            config = tiny_config(**DISK_RUN, dataset=str(shapes), output_dir=str(disk / "out"))
            config.resume_from_checkpoint = "latest"
            result = CrossMetricTrainer(config).train()
        assert result.global_step == 3 and complete_checkpoints(run)[-1].name == "checkpoint-3"


def test_disk_full_error_from_the_writer_is_reported_clearly(shapes, tmp_path, monkeypatch, capsys) -> None:
    """Where no tmpfs can be mounted: the write fails with ENOSPC after the weights file is half written."""

    def fill(staging: Path) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "model.safetensors").write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "optimizer.bin"))

    err, before = run_until_disk_full(shapes, tmp_path / "out", fill, monkeypatch, capsys)
    run = tmp_path / "out" / "run"
    assert "No space left on the device while writing checkpoint-2" in err and "Traceback" not in err
    assert "resume with --resume_from_checkpoint latest" in err
    assert checkpoint_digests(run) == before and list(before) == ["checkpoint-1"]
    assert not list((run / "checkpoints").glob(".checkpoint-*"))


def test_pause_points_pause_only_the_requested_occurrence(monkeypatch, capsys) -> None:
    from collections import Counter

    from crossmetric.utils import fault_points

    monkeypatch.setattr(fault_points, "_reached", Counter())
    fault_points.fault_point("evaluation")  # no variable: nothing happens
    monkeypatch.setenv("CROSSMETRIC_TEST_PAUSE", "evaluation:2:0")
    for name in ("evaluation", "checkpoint_write", "evaluation", "evaluation"):
        fault_points.fault_point(name)
    assert capsys.readouterr().out == "CROSSMETRIC_TEST_PAUSE evaluation #2\n"


def test_a_kill_while_deleting_a_checkpoint_never_leaves_a_complete_looking_folder(tmp_path, monkeypatch) -> None:
    """Replacing checkpoint-N (saved twice) or rotating old ones deletes folders; a kill half way through a
    deletion must not leave a ``checkpoint-N`` that has its COMPLETE marker but lacks files."""
    from crossmetric.training import checkpointing

    def contents(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"weights")

    run = tmp_path / "run"
    checkpointing.write_checkpoint(run, 1, contents, {"global_step": 1}, keep=1)
    real_rmtree = shutil.rmtree

    class Killed(BaseException):
        pass

    def rmtree_then_killed(path, ignore_errors=False):  # deletes one file of a folder, then the process is gone
        if Path(path).exists():
            (Path(path) / "model.safetensors").unlink(missing_ok=True)
            monkeypatch.setattr(checkpointing.shutil, "rmtree", lambda *args, **kwargs: None)  # a dead process
            raise Killed

    for step in (1, 2):  # the same step saved again (replaces it), then a rotation (keep=1) of the older one
        monkeypatch.setattr(checkpointing.shutil, "rmtree", rmtree_then_killed)
        with pytest.raises(Killed):
            checkpointing.write_checkpoint(run, step, contents, {"global_step": step}, keep=1)
        monkeypatch.setattr(checkpointing.shutil, "rmtree", real_rmtree)
        survivors = complete_checkpoints(run)
        assert survivors[-1].name == f"checkpoint-{step}"
        assert all((c / "model.safetensors").is_file() for c in survivors), survivors
