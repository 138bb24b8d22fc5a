"""Pushing a model folder to a Hub over real HTTP (the local Hub-compatible server in _hub_server.py).

The client side is the installed ``huggingface_hub`` (upload through preupload / LFS batch / commit,
download through snapshot_download / hf_hub_download), unmodified; only its endpoint is ours.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import _hub_server
import httpx2
import numpy as np
import pytest
from _hub_server import HubServer
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.numpy import save_file

from crossmetric.cli.push import add_push_arguments, run_push
from crossmetric.hub.push import HubPushError, check_repo_id, push_to_hub_folder
from crossmetric.model_cards.model_card import CrossMetricModelCardData, write_model_card

# The fixture, bound here so that pytest finds it (an assignment, not an import, keeps ruff's F811 quiet).
hub_server = _hub_server.hub_server

REPO = "tester/crossmetric-test"


def make_model_folder(root: Path) -> Path:
    """A folder shaped like an export: safetensors weights, configs, a model card, a nested file."""
    folder = root / "export"
    folder.mkdir()
    rng = np.random.default_rng(0)
    save_file({"embed.weight": rng.standard_normal((16, 8)).astype(np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "crossmetric", "embedding_dim": 8}))
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    card = CrossMetricModelCardData(model_id=REPO, backbone="tf_efficientnet_lite0", embedding_dim=8, cia_levels=2)
    write_model_card(card, folder)
    (folder / "extras").mkdir()
    (folder / "extras" / "notes.txt").write_text("trained on glyphs\n")
    return folder


def folder_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex digest), to detect any change."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def local_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_model_folder(tmp_path)


@pytest.fixture
def logged_in(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    return hub_server


def test_push_then_download_gives_the_same_bytes(logged_in: HubServer, folder: Path, tmp_path: Path):
    commit = push_to_hub_folder(folder, REPO, commit_message="first export")

    assert commit.commit_url.startswith(f"{logged_in.url}/{REPO}/commit/")
    refs = HfApi().list_repo_refs(REPO)
    assert [(b.name, b.target_commit) for b in refs.branches] == [("main", commit.oid)]
    # The weights went through LFS (batch + PUT of the bytes), the JSON files as regular git blobs.
    repo = logged_in.store.get("model", REPO)
    files = repo.commits[commit.oid].files
    assert files["model.safetensors"].is_lfs and not files["config.json"].is_lfs
    assert len(logged_in.requests_to(r"^/_lfs_upload/", "PUT")) == 1
    assert repo.commits[commit.oid].title == "first export"

    snapshot = Path(snapshot_download(REPO, cache_dir=tmp_path / "dl"))
    downloaded = local_files(snapshot)
    assert downloaded.pop(".gitattributes")  # every Hub repo starts with one
    assert downloaded == local_files(folder)
    one = hf_hub_download(REPO, "extras/notes.txt", cache_dir=tmp_path / "dl2")
    assert Path(one).read_bytes() == (folder / "extras" / "notes.txt").read_bytes()

    # The card's front matter is what the Hub reads as metadata.
    info = HfApi().model_info(REPO)
    assert info.sha == commit.oid
    assert info.card_data.library_name == "crossmetric"
    assert info.pipeline_tag == "image-feature-extraction"


def test_range_request_returns_the_requested_bytes(logged_in: HubServer, folder: Path):
    push_to_hub_folder(folder, REPO)
    url = f"{logged_in.url}/{REPO}/resolve/main/model.safetensors"
    data = (folder / "model.safetensors").read_bytes()
    response = httpx2.get(url, headers={"Range": "bytes=10-99"})
    assert response.status_code == 206
    assert response.content == data[10:100]
    assert response.headers["Content-Range"] == f"bytes 10-99/{len(data)}"
    assert response.headers["X-Linked-Size"] == str(len(data))
    assert response.headers["X-Linked-Etag"] == f'"{hashlib.sha256(data).hexdigest()}"'


def test_private_repo_is_invisible_without_the_token(
    logged_in: HubServer, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    push_to_hub_folder(folder, REPO, private=True)
    assert logged_in.is_private(REPO)
    assert (
        Path(hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "a")).read_bytes()
        == (folder / "config.json").read_bytes()
    )

    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download(REPO, cache_dir=tmp_path / "b")


def test_branch_and_pull_request_leave_main_alone(logged_in: HubServer, folder: Path, tmp_path: Path):
    first = push_to_hub_folder(folder, REPO)
    (folder / "config.json").write_text(json.dumps({"model_type": "crossmetric", "embedding_dim": 16}))

    on_branch = push_to_hub_folder(folder, REPO, revision="experiment-1")
    pr = push_to_hub_folder(folder, REPO, create_pr=True, commit_message="Bigger embedding")

    refs = HfApi().list_repo_refs(REPO, include_pull_requests=True)
    assert {b.name: b.target_commit for b in refs.branches} == {"main": first.oid, "experiment-1": on_branch.oid}
    assert [(p.ref, p.target_commit) for p in refs.pull_requests] == [("refs/pr/1", pr.oid)]
    assert pr.pr_url == f"{logged_in.url}/{REPO}/discussions/1" and pr.pr_revision == "refs/pr/1"

    new, old = (folder / "config.json").read_bytes(), logged_in.repo_files(REPO, first.oid)["config.json"]
    assert new != old
    for revision, expected in (("main", old), ("experiment-1", new), ("refs/pr/1", new)):
        path = hf_hub_download(REPO, "config.json", revision=revision, cache_dir=tmp_path / "dl")
        assert Path(path).read_bytes() == expected, revision


def test_token_is_only_sent_as_authorization_header_never_written_or_logged(
    logged_in: HubServer,
    folder: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
):
    caplog.set_level(logging.DEBUG)
    parser = add_push_arguments(argparse.ArgumentParser())
    assert run_push(parser.parse_args(["--model", str(folder), "--repo-id", REPO, "--private"])) == 0
    snapshot_download(REPO, cache_dir=tmp_path / "dl")
    logged_in.inject_fault(f"/api/models/{REPO}/commit", status=500)
    (folder / "config.json").write_text("{}")
    with pytest.raises(HubPushError):
        push_to_hub_folder(folder, REPO)

    token = logged_in.token
    authorized = [r for r in logged_in.requests if r.header("Authorization") == f"Bearer {token}"]
    assert len(authorized) >= 5  # the token was used ...
    assert logged_in.token_exposures() == []  # ... only ever in the Authorization header
    for put in logged_in.requests_to(r"^/_lfs_upload/", "PUT"):  # uploads to storage go without it
        assert put.header("Authorization") is None
    captured = capsys.readouterr()
    assert f"{logged_in.url}/{REPO}/commit/" in captured.out
    assert token not in captured.out + captured.err
    assert caplog.records and token not in caplog.text
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10
    assert [p for p in written if token.encode() in p.read_bytes()] == []


def test_server_error_on_commit_raises_and_changes_nothing(logged_in: HubServer, folder: Path):
    before = folder_digest(folder)
    logged_in.inject_fault(f"/api/models/{REPO}/commit", status=500, times=10)
    with pytest.raises(HubPushError, match="HTTP 500") as info:
        push_to_hub_folder(folder, REPO)
    assert info.value.status == 500
    assert folder_digest(folder) == before
    assert set(logged_in.repo_files(REPO)) == {".gitattributes"}  # no partial commit on the server


def test_dropped_connection_raises_and_changes_nothing(logged_in: HubServer, folder: Path):
    before = folder_digest(folder)
    logged_in.inject_fault(f"/api/models/{REPO}/commit", status=None)
    with pytest.raises(HubPushError, match="RemoteProtocolError") as info:
        push_to_hub_folder(folder, REPO)
    assert info.value.status is None
    assert folder_digest(folder) == before


def test_transient_server_error_is_retried(logged_in: HubServer, folder: Path):
    logged_in.inject_fault(f"/api/models/{REPO}/preupload", status=503, times=1)
    commit = push_to_hub_folder(folder, REPO)
    assert len(logged_in.requests_to(r"/preupload/", "POST")) == 2
    assert logged_in.repo_files(REPO, commit.oid)["config.json"] == (folder / "config.json").read_bytes()


def test_foreign_namespace_is_refused_with_status(logged_in: HubServer, folder: Path):
    with pytest.raises(HubPushError) as info:
        push_to_hub_folder(folder, "someone-else/model")
    assert info.value.status == 403


@pytest.mark.parametrize(
    "repo_id",
    ["no-namespace", "a/b/c", "../etc/passwd", "/abs/path", "ns/na\x00me", "ns/..", "ns/-bad", "C:/x", "", "ns/"],
)
def test_bad_repo_id_is_refused_before_any_request(hub_server: HubServer, folder: Path, repo_id: str):
    with pytest.raises(ValueError, match="repo_id"):
        push_to_hub_folder(folder, repo_id, token=hub_server.token)
    assert hub_server.requests == []


@pytest.mark.parametrize("kwargs", [{"revision": "refs/pr/1"}, {"revision": "a..b"}, {"revision": "has space"},
                                    {"revision": "dev", "create_pr": True}])  # fmt: skip
def test_bad_revision_is_refused_before_any_request(hub_server: HubServer, folder: Path, kwargs: dict):
    with pytest.raises(ValueError):
        push_to_hub_folder(folder, REPO, token=hub_server.token, **kwargs)
    assert hub_server.requests == []


def test_missing_token_or_folder_is_refused_before_any_request(hub_server: HubServer, folder: Path, tmp_path: Path):
    with pytest.raises(HubPushError, match="HF_TOKEN"):
        push_to_hub_folder(folder, REPO)
    with pytest.raises(ValueError, match="not a directory"):
        push_to_hub_folder(tmp_path / "missing", REPO, token=hub_server.token)
    assert hub_server.requests == []
    assert check_repo_id("ns/Name_1.v2") == "ns/Name_1.v2"


def test_cli_exit_codes(logged_in: HubServer, folder: Path, capsys: pytest.CaptureFixture[str]):
    parser = add_push_arguments(argparse.ArgumentParser())
    (folder / "config.json").unlink()
    assert run_push(parser.parse_args(["--model", str(folder), "--repo-id", REPO])) == 2
    assert "config.json" in capsys.readouterr().err
    (folder / "config.json").write_text("{}")
    logged_in.inject_fault("/api/repos/create", status=500)
    assert run_push(parser.parse_args(["--model", str(folder), "--repo-id", REPO])) == 1
    assert "HTTP 500" in capsys.readouterr().err
    args = ["--model", str(folder), "--repo-id", REPO, "--create-pr", "--commit-message", "via CLI"]
    assert run_push(parser.parse_args(args)) == 0
    assert "pull request: " in capsys.readouterr().out


def test_subprocess_client_configured_by_environment_only(logged_in: HubServer, folder: Path, tmp_path: Path):
    """Another process finds the server through HF_ENDPOINT and friends alone (as a CLI would)."""
    push_to_hub_folder(folder, REPO, private=True)
    code = (
        "import sys; from huggingface_hub import hf_hub_download; "
        f"sys.stdout.write(open(hf_hub_download({REPO!r}, 'config.json'), 'rb').read().decode())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout == (folder / "config.json").read_text()
