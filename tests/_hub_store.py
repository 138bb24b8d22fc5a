"""Repository storage behind the test Hub server (tests/_hub_server.py).

Git-like enough for ``huggingface_hub`` clients: every repo has branches, pull-request refs
(``refs/pr/N``) and immutable commits; each commit maps paths to entries that carry the same ids the
Hub reports (git blob sha1 as ``oid``; for LFS files the sha1 of the pointer file plus the content's
sha256 and size). File bytes live in a temp dir, content-addressed, so tests can look at what was
stored. Written by hand because no package ships a Hub-compatible server; only the parts the
installed ``huggingface_hub`` uses are modelled.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

# The LFS patterns of the .gitattributes the Hub puts in every new model repo (a subset of it).
DEFAULT_LFS_PATTERNS: tuple[str, ...] = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
    "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*",
    "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)  # fmt: skip
# Files above this size go to LFS whatever their name, as on the Hub.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a blob: sha1 of ``b"blob <size>\\0" + data`` (what the Hub reports as ``oid``)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands for an LFS object in the git tree."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def gitattributes_text(patterns: tuple[str, ...] = DEFAULT_LFS_PATTERNS) -> str:
    return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in patterns)


def is_lfs_path(path: str, size: int, sample: bytes) -> bool:
    """Decide the upload mode as the Hub does: LFS pattern, large file, or binary content (a NUL byte)."""
    name = PurePosixPath(path).name
    for pattern in DEFAULT_LFS_PATTERNS:
        if fnmatch.fnmatch(path if "/" in pattern else name, pattern):
            return True
    return size >= LFS_SIZE_THRESHOLD or b"\x00" in sample


@dataclass
class Entry:
    """One file in a commit's tree."""

    oid: str  # git blob sha1 (of the pointer file for LFS files)
    size: int  # size of the content (not of the pointer)
    sha256: str | None = None  # set for LFS files
    pointer_size: int | None = None

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    description: str
    date: str
    files: dict[str, Entry]


@dataclass
class Repo:
    repo_type: str  # "model", "dataset" or "space"
    repo_id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    pull_requests: dict[int, str] = field(default_factory=dict)  # number -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def url_path(self) -> str:
        """Path of the repo's web page on the Hub: ``ns/name`` for models, ``datasets/ns/name`` otherwise."""
        return self.repo_id if self.repo_type == "model" else f"{self.repo_type}s/{self.repo_id}"

    def resolve(self, revision: str) -> str | None:
        """Commit oid a revision names: branch, ``refs/heads/<b>``, ``refs/pr/<n>`` or a full commit id."""
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/") :]
        if revision in self.branches:
            return self.branches[revision]
        if revision.startswith("refs/pr/") and revision[len("refs/pr/") :].isdigit():
            return self.pull_requests.get(int(revision[len("refs/pr/") :]))
        return revision if revision in self.commits else None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class RepoStore:
    """All repos of the test server, kept in memory and mirrored to ``root`` (thread-safe)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}

    # -- paths -------------------------------------------------------------------------------------
    def repo_dir(self, repo: Repo) -> Path:
        return self.root / f"{repo.repo_type}s" / repo.repo_id

    def blob_path(self, repo: Repo, entry: Entry) -> Path:
        """Where a file's content lives: ``lfs/<sha256>`` for LFS files, ``blobs/<sha1>`` otherwise."""
        if entry.is_lfs:
            return self.repo_dir(repo) / "lfs" / str(entry.sha256)
        return self.repo_dir(repo) / "blobs" / entry.oid

    def lfs_object_path(self, repo: Repo, sha256: str) -> Path:
        return self.repo_dir(repo) / "lfs" / sha256

    def _save(self, repo: Repo) -> None:
        """Mirror the repo's refs and commits to ``repo.json`` so a test can inspect them on disk."""
        path = self.repo_dir(repo) / "repo.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(repo), indent=1))
        tmp.replace(path)

    # -- repos -------------------------------------------------------------------------------------
    def get(self, repo_type: str, repo_id: str) -> Repo | None:
        with self.lock:
            return self.repos.get((repo_type, repo_id))

    def create(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        """A new repo with one commit on ``main`` holding the Hub's default ``.gitattributes``."""
        with self.lock:
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
            self.repos[(repo_type, repo_id)] = repo
            data = gitattributes_text().encode()
            oid = self.store_regular(repo, data)
            commit = self._make_commit(repo, None, "initial commit", "", {".gitattributes": Entry(oid, len(data))})
            repo.branches["main"] = commit.oid
            self._save(repo)
            return repo

    def store_regular(self, repo: Repo, data: bytes) -> str:
        oid = git_blob_sha1(data)
        path = self.repo_dir(repo) / "blobs" / oid
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_bytes(data)
        return oid

    def lfs_entry(self, repo: Repo, sha256: str) -> Entry | None:
        """An LFS entry for an uploaded object, or None when the object was never uploaded."""
        path = self.lfs_object_path(repo, sha256)
        if not path.is_file():
            return None
        size = path.stat().st_size
        pointer = lfs_pointer(sha256, size)
        return Entry(git_blob_sha1(pointer), size, sha256, len(pointer))

    def _make_commit(
        self, repo: Repo, parent: str | None, title: str, description: str, files: dict[str, Entry]
    ) -> Commit:
        payload = json.dumps([parent, title, description, time.time_ns(), sorted(files)]).encode()
        oid = hashlib.sha1(payload).hexdigest()
        commit = Commit(oid, parent, title, description, _now(), dict(files))
        repo.commits[oid] = commit
        return commit

    def commit(
        self, repo: Repo, base_oid: str, title: str, description: str, changes: dict[str, Entry | None]
    ) -> Commit:
        """A new commit on top of ``base_oid``: ``changes`` maps path -> entry (None deletes the path)."""
        with self.lock:
            files = dict(repo.commits[base_oid].files)
            for path, entry in changes.items():
                if entry is None:
                    files = {p: e for p, e in files.items() if p != path and not p.startswith(path + "/")}
                else:
                    files[path] = entry
            commit = self._make_commit(repo, base_oid, title, description, files)
            self._save(repo)
            return commit

    def set_branch(self, repo: Repo, name: str, oid: str) -> None:
        with self.lock:
            repo.branches[name] = oid
            self._save(repo)

    def open_pull_request(self, repo: Repo, oid: str) -> int:
        with self.lock:
            number = max(repo.pull_requests, default=0) + 1
            repo.pull_requests[number] = oid
            self._save(repo)
            return number

    def set_pull_request(self, repo: Repo, number: int, oid: str) -> None:
        with self.lock:
            repo.pull_requests[number] = oid
            self._save(repo)

    def read_files(self, repo_type: str, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file of a revision with its bytes (for test assertions)."""
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            oid = repo.resolve(revision)
            if oid is None:
                raise KeyError(f"{repo_id} has no revision {revision!r}")
            files = repo.commits[oid].files
            return {path: self.blob_path(repo, entry).read_bytes() for path, entry in files.items()}
