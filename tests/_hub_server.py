"""A small Hugging Face Hub-compatible HTTP server for tests, and the ``hub_server`` pytest fixture.

It answers the endpoints the installed ``huggingface_hub`` (2.x, httpx2 client) calls to create a
repo, create a branch, pre-upload (``uploadMode`` per file), upload LFS objects (batch API, basic
transfer, with a verify step), commit (NDJSON), open a pull request (``create_pr=1`` -> ``refs/pr/N``),
read repo info, list trees and refs, and resolve files (HEAD / GET with Range). Xet is not served:
the fixture sets ``HF_HUB_DISABLE_XET`` so clients take the LFS / regular path.

Every request is recorded (method, path, headers, body) so that tests can check what a client sent,
e.g. that a token only ever travels in the ``Authorization`` header (:meth:`HubServer.token_exposures`).
Faults can be injected per path prefix: an HTTP status N times, or a dropped connection.

Written by hand (stdlib ``http.server``) because no installable package provides a Hub to test
against and the tests must not reach the real Hub. Repos live in a temp dir (``.repos_dir``).

Use from a test module::

    from _hub_server import hub_server  # noqa: F401  (pytest fixture)

    def test_x(hub_server):
        hub_server.url, hub_server.token, hub_server.requests, hub_server.repos_dir
        hub_server.inject_fault("/api/models/tester/x/commit", status=500, times=1)
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from _hub_api import HubRequestHandler
from _hub_store import RepoStore


@dataclass
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str  # raw path including the query string
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass
class Fault:
    """Answer ``status`` (or drop the connection when ``status`` is None) to the next ``times`` matches."""

    path_prefix: str
    times: int
    status: int | None
    method: str | None


class HubServer:
    """The test Hub: start with :meth:`start`, stop with :meth:`close`; ``url`` is its endpoint.

    ``token`` is the one valid write token, owned by user ``user``; the namespaces a token may write
    to are ``user`` and ``orgs``. Private repos can be read with that token only.
    """

    def __init__(self, repos_dir: Path, user: str = "tester", orgs: tuple[str, ...] = ("crossmetric-org",)):
        self.repos_dir = Path(repos_dir)
        self.user = user
        self.orgs = orgs
        # Looks like a real user access token so that any leak of it is easy to grep for.
        self.token = "hf_" + secrets.token_hex(17)
        self.store = RepoStore(self.repos_dir)
        self.requests: list[RecordedRequest] = []
        self.faults: list[Fault] = []
        self.lfs_uploads: dict[str, tuple[str, str, str, int]] = {}  # upload key -> repo type, id, sha256, size
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> HubServer:
        handler = type("BoundHubRequestHandler", (HubRequestHandler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- recording and faults ----------------------------------------------------------------------
    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def inject_fault(self, path_prefix: str, *, status: int | None = 500, times: int = 1, method: str | None = None):
        """Make the next ``times`` requests whose path starts with ``path_prefix`` fail.

        ``status=None`` closes the connection without answering (a dropped connection).
        """
        with self._lock:
            self.faults.append(Fault(path_prefix, times, status, method))

    def take_fault(self, method: str, path: str) -> Fault | None:
        """The fault that applies to this request, if any (and count it down)."""
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and path.startswith(fault.path_prefix) and fault.method in (None, method):
                    fault.times -= 1
                    return fault
        return None

    def requests_to(self, path_regex: str, method: str | None = None) -> list[RecordedRequest]:
        pattern = re.compile(path_regex)
        return [r for r in self.requests if pattern.search(r.path) and method in (None, r.method)]

    def token_exposures(self, token: str | None = None) -> list[str]:
        """Every place a request carried the token other than ``Authorization: Bearer <token>``."""
        token = token or self.token
        found = []
        for r in self.requests:
            if token in r.path:
                found.append(f"{r.method} {r.path}: in the URL")
            for name, value in r.headers:
                if token in value and not (name.lower() == "authorization" and value == f"Bearer {token}"):
                    found.append(f"{r.method} {r.path}: in header {name}")
            if token.encode() in r.body:
                found.append(f"{r.method} {r.path}: in the body")
        return found

    # -- auth --------------------------------------------------------------------------------------
    def user_for(self, authorization: str | None) -> str | None:
        """The user a request authenticates as; raises PermissionError for a wrong token."""
        if authorization is None:
            return None
        if authorization != f"Bearer {self.token}":
            raise PermissionError("Invalid credentials in Authorization header")
        return self.user

    def may_write(self, user: str | None, repo_id: str) -> bool:
        return user is not None and repo_id.split("/")[0] in (self.user, *self.orgs)

    # -- inspection --------------------------------------------------------------------------------
    def repo_files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """Files (path -> bytes) of a revision as stored on the server."""
        return self.store.read_files(repo_type, repo_id, revision)

    def is_private(self, repo_id: str, repo_type: str = "model") -> bool:
        repo = self.store.get(repo_type, repo_id)
        if repo is None:
            raise KeyError(repo_id)
        return repo.private


def configure_client(monkeypatch: pytest.MonkeyPatch, url: str, cache_dir: Path) -> None:
    """Point ``huggingface_hub`` in this process, and subprocesses via the env, at ``url``.

    ``huggingface_hub`` reads these settings once at import, into ``huggingface_hub.constants``, so
    both the constants and the environment are patched. Offline mode is switched off (the test
    suite runs with ``HF_HUB_OFFLINE=1`` against the real Hub; this server is local).
    """
    from huggingface_hub import constants

    env = {
        "HF_ENDPOINT": url,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": "0",
        "HF_HUB_CACHE": str(cache_dir),
        "HF_TOKEN_PATH": str(cache_dir / "no-token"),
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # No token file from a real login may leak into the tests: point the token path at an empty dir.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache_dir / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(cache_dir / "no-stored-tokens"))
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running :class:`HubServer` with ``huggingface_hub`` configured to use it (no token set).

    Set ``HF_TOKEN`` to ``hub_server.token`` (monkeypatch.setenv) to act as the logged-in user.
    """
    server = HubServer(tmp_path / "hub-repos").start()
    configure_client(monkeypatch, server.url, tmp_path / "hf-cache")
    try:
        yield server
    finally:
        from huggingface_hub.utils import close_session

        close_session()  # drop the client's pooled keep-alive connections, so handler threads end too
        server.close()


__all__ = ["Fault", "HubServer", "RecordedRequest", "configure_client", "hub_server"]
