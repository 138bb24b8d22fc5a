"""Request handler of the test Hub server: the Hub's HTTP API as ``huggingface_hub`` 2.x calls it.

Routes (``{t}`` = ``model``/``dataset``/``space``, ``{p}`` = ``""``/``datasets/``/``spaces/``):

- ``POST /api/repos/create``, ``POST /api/validate-yaml``, ``GET /api/whoami-v2``
- ``GET /api/{t}s/{ns}/{name}[/revision/{rev}]``: repo info (``sha``, ``siblings``, ``cardData``...)
- ``GET /api/{t}s/{ns}/{name}/tree/{rev}[/{path}]``, ``GET .../refs``, ``POST .../branch/{branch}``
- ``POST /api/{t}s/{ns}/{name}/preupload/{rev}``, ``POST .../commit/{rev}[?create_pr=1]`` (NDJSON)
- ``POST /{p}{ns}/{name}.git/info/lfs/objects/batch`` and ``.../verify``; ``PUT /_lfs_upload/{key}``
- ``HEAD|GET /{p}{ns}/{name}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files, and Range requests.

Errors carry the ``X-Error-Code`` header the client maps to its exception types.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from _hub_lfs import HubError, LfsTransfers
from _hub_store import Entry, Repo, is_lfs_path

if TYPE_CHECKING:
    from _hub_server import HubServer

_SEG = r"[^/]+"
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_PREFIX_TYPES = {None: "model", "datasets": "dataset", "spaces": "space"}
API_ROUTE = re.compile(rf"^/api/(models|datasets|spaces)/({_SEG}/{_SEG})(?:/(\w[\w-]*)(?:/(.*))?)?$")
LFS_ROUTE = re.compile(rf"^/(?:(datasets|spaces)/)?({_SEG}/{_SEG})\.git/info/lfs/objects/(batch|verify)$")
RESOLVE_ROUTE = re.compile(rf"^/(?:(datasets|spaces)/)?({_SEG}/{_SEG})/resolve/({_SEG})/(.+)$")


class HubRequestHandler(LfsTransfers, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    hub: HubServer  # bound by HubServer.start()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    # -- plumbing ----------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        """The request body, from Content-Length or chunked transfer encoding."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _handle(self) -> None:
        from _hub_server import RecordedRequest

        body = self._read_body()
        self.hub.record(RecordedRequest(self.command, self.path, list(self.headers.items()), body))
        split = urlsplit(self.path)
        fault = self.hub.take_fault(self.command, split.path)
        if fault is not None:
            if fault.status is None:  # dropped connection: no answer at all
                self.close_connection = True
                self.connection.close()
                return
            self._json({"error": f"injected fault {fault.status}"}, fault.status)
            return
        try:
            self.user = self.hub.user_for(self.headers.get("Authorization"))
            self._route(split.path, parse_qs(split.query), body)
        except PermissionError as err:
            self._json({"error": str(err)}, 401, {"X-Error-Message": str(err)})
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            if err.commit:
                headers["X-Repo-Commit"] = err.commit
            self._json({"error": err.message}, err.status, headers)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle  # noqa: N815 - http.server's naming

    # -- routing -----------------------------------------------------------------------------------
    def _route(self, path: str, query: dict[str, list[str]], body: bytes) -> None:
        method = self.command
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(json.loads(body or b"{}"))
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body or b"{}"))
        if method == "GET" and path == "/api/whoami-v2":
            if self.user is None:
                raise HubError(401, "Invalid username or password.")
            return self._json(
                {
                    "type": "user",
                    "name": self.user,
                    "orgs": [{"name": o} for o in self.hub.orgs],
                    "auth": {"type": "access_token", "accessToken": {"role": "write"}},
                }
            )
        if method == "PUT" and path.startswith("/_lfs_upload/"):
            return self._lfs_put(path.rsplit("/", 1)[-1], body)
        if match := API_ROUTE.match(path):
            kind, repo_id, action, rest = match.groups()
            return self._api(method, _TYPES[kind], repo_id, action, unquote(rest or ""), query, body)
        if match := LFS_ROUTE.match(path):
            prefix, repo_id, action = match.groups()
            repo = self._repo(_PREFIX_TYPES[prefix], repo_id, write=True)
            return self._lfs_batch(repo, json.loads(body)) if action == "batch" else self._lfs_verify(repo, body)
        if (match := RESOLVE_ROUTE.match(path)) and method in ("GET", "HEAD"):
            prefix, repo_id, revision, filename = match.groups()
            return self._resolve(_PREFIX_TYPES[prefix], repo_id, unquote(revision), unquote(filename))
        raise HubError(404, f"Not found: {method} {path} (not served by the test Hub)")

    def _api(self, method, repo_type, repo_id, action, rest, query, body) -> None:
        write = method in ("POST", "PUT", "DELETE")
        repo = self._repo(repo_type, repo_id, write=write)
        if action is None and method == "GET":
            return self._json(self._info(repo, "main", query))
        if action == "revision" and method == "GET":
            return self._json(self._info(repo, rest, query))
        if action == "tree" and method == "GET":
            revision, _, subpath = rest.partition("/")
            return self._json(self._tree(repo, revision, subpath, query))
        if action == "refs" and method == "GET":
            return self._json(self._refs(repo, query))
        if action == "branch" and method == "POST":
            return self._create_branch(repo, rest, json.loads(body or b"{}"))
        if action == "preupload" and method == "POST":
            return self._preupload(repo, rest, json.loads(body))
        if action == "commit" and method == "POST":
            return self._commit(repo, rest, body, create_pr=query.get("create_pr") == ["1"])
        raise HubError(404, f"Not found: {method} /api/{repo_type}s/{repo_id}/{action}")

    def _repo(self, repo_type: str, repo_id: str, *, write: bool) -> Repo:
        """The repo, if this request may see it (and write to it); the Hub's 401/403 answers otherwise."""
        repo = self.hub.store.get(repo_type, repo_id)
        if repo is None or (repo.private and not self.hub.may_write(self.user, repo_id)):
            raise HubError(401 if self.user is None else 404, "Repository not found", "RepoNotFound")
        if write and self.user is None:
            raise HubError(401, "You must be authenticated to write to a repo", "RepoNotFound")
        if write and not self.hub.may_write(self.user, repo_id):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _commit_oid(self, repo: Repo, revision: str) -> str:
        oid = repo.resolve(revision)
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid

    # -- repos, refs, info -------------------------------------------------------------------------
    def _create_repo(self, payload: dict) -> None:
        if self.user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if not self.hub.may_write(self.user, repo_id):
            raise HubError(403, f"You don't have the rights to create a {repo_type} under {repo_id.split('/')[0]}")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self.hub.store.lock:
            existing = self.hub.store.get(repo_type, repo_id)
            repo = existing or self.hub.store.create(repo_type, repo_id, private)
        url = f"{self.hub.url}/{repo.url_path}"
        if existing is not None:
            raise_url = {"error": "You already created this model repo", "url": url}
            return self._json(raise_url, 409, {"X-Error-Message": raise_url["error"]})
        return self._json({"url": url, "name": repo_id, "id": secrets.token_hex(12)})

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
        try:
            meta = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return self._json({"errors": [{"message": f"Invalid YAML: {err}"}]}, 400)
        if meta is not None and not isinstance(meta, dict):
            return self._json({"errors": [{"message": "YAML metadata must be a mapping"}]}, 400)
        return self._json({"warnings": []})

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> None:
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit_oid(repo, payload.get("startingPoint") or "main")
        self.hub.store.set_branch(repo, branch, start)
        return self._json({})

    def _refs(self, repo: Repo, query: dict) -> dict:
        def ref(name: str, full: str, oid: str) -> dict:
            return {"name": name, "ref": full, "targetCommit": oid}

        data: dict = {
            "branches": [ref(b, f"refs/heads/{b}", o) for b, o in repo.branches.items()],
            "converts": [],
            "tags": [],
        }
        if query.get("include_prs") == ["1"]:
            data["pullRequests"] = [ref(f"refs/pr/{n}", f"refs/pr/{n}", o) for n, o in repo.pull_requests.items()]
        return data

    def _card_data(self, repo: Repo, files: dict[str, Entry]) -> dict | None:
        if "README.md" not in files or files["README.md"].is_lfs:
            return None
        text = self.hub.store.blob_path(repo, files["README.md"]).read_text(encoding="utf-8")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
        meta = yaml.safe_load(match.group(1)) if match else None
        return meta if isinstance(meta, dict) else None

    def _info(self, repo: Repo, revision: str, query: dict) -> dict:
        commit = repo.commits[self._commit_oid(repo, revision)]
        blobs = query.get("blobs") in (["True"], ["true"], ["1"])
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.is_lfs:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        card = self._card_data(repo, commit.files)
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "createdAt": repo.created_at,
            "lastModified": commit.date,
            "downloads": 0,
            "likes": 0,
            "tags": list((card or {}).get("tags") or []),
            "siblings": siblings,
        }
        if card is not None:
            info.update(cardData=card, pipeline_tag=card.get("pipeline_tag"), library_name=card.get("library_name"))
        return info

    def _tree(self, repo: Repo, revision: str, subpath: str, query: dict) -> list[dict]:
        commit = repo.commits[self._commit_oid(repo, unquote(revision))]
        recursive = query.get("recursive") in (["True"], ["true"], ["1"])
        prefix = subpath.strip("/") + "/" if subpath.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in commit.files):
            raise HubError(404, f"{subpath} does not exist on {revision}", "EntryNotFound", commit.oid)
        out, folders = [], set()
        for path, entry in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):  # folders on the way to this file
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                item: dict = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
                if entry.is_lfs:
                    item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
                out.append(item)
        out += [
            {"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
            for f in sorted(folders)
        ]
        return out

    # -- uploads -----------------------------------------------------------------------------------
    def _preupload(self, repo: Repo, revision: str, payload: dict) -> None:
        files = repo.commits[self._commit_oid(repo, revision)].files
        answer = []
        for item in payload["files"]:
            lfs = is_lfs_path(item["path"], int(item["size"]), base64.b64decode(item["sample"]))
            entry = files.get(item["path"])
            remote_oid = None if entry is None else (entry.sha256 if entry.is_lfs else entry.oid)
            answer.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": remote_oid,
                }
            )
        return self._json({"files": answer})

    def _commit(self, repo: Repo, revision: str, body: bytes, *, create_pr: bool) -> None:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        base = self._commit_oid(repo, revision)
        if repo.resolve(revision) == revision and revision not in repo.branches:
            raise HubError(400, "Cannot commit to a commit id; use a branch or refs/pr/N")
        if header.get("parentCommit") and header["parentCommit"] != base:
            raise HubError(412, "A commit has happened since the parent commit. Please pull and retry.")
        changes: dict[str, Entry | None] = {}
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                data = base64.b64decode(value["content"])
                if is_lfs_path(value["path"], len(data), data[:512]) and data:
                    raise HubError(400, f"Your push was rejected: {value['path']} must be stored with LFS")
                changes[value["path"]] = Entry(self.hub.store.store_regular(repo, data), len(data))
            elif key == "lfsFile":
                entry = self.hub.store.lfs_entry(repo, value["oid"])
                if entry is None or ("size" in value and entry.size != int(value["size"])):
                    raise HubError(422, f"LFS object {value['oid']} for {value['path']} was not uploaded")
                changes[value["path"]] = entry
            elif key in ("deletedFile", "deletedFolder"):
                changes[value["path"].rstrip("/")] = None
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        commit = self.hub.store.commit(repo, base, header.get("summary", ""), header.get("description", ""), changes)
        answer = {
            "success": True,
            "commitOid": commit.oid,
            "commitUrl": f"{self.hub.url}/{repo.url_path}/commit/{commit.oid}",
        }
        if create_pr:
            number = self.hub.store.open_pull_request(repo, commit.oid)
            answer["pullRequestUrl"] = f"{self.hub.url}/{repo.url_path}/discussions/{number}"
        elif revision.startswith("refs/pr/"):
            self.hub.store.set_pull_request(repo, int(revision.split("/")[-1]), commit.oid)
        else:
            self.hub.store.set_branch(repo, revision.removeprefix("refs/heads/"), commit.oid)
        return self._json(answer)

    # -- downloads ---------------------------------------------------------------------------------
    def _resolve(self, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo(repo_type, repo_id, write=False)
        oid = self._commit_oid(repo, revision)
        entry = repo.commits[oid].files.get(filename)
        if entry is None:
            raise HubError(404, f"Entry not found: {filename}", "EntryNotFound", oid)
        data = self.hub.store.blob_path(repo, entry).read_bytes()
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": oid,
            "Accept-Ranges": "bytes",
            "ETag": f'"{entry.oid}"',
            "Content-Disposition": f'inline; filename="{filename.split("/")[-1]}"',
        }
        if entry.is_lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        status, range_header = 200, self.headers.get("Range")
        if range_header and (match := re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())):
            start_s, end_s = match.groups()
            start = int(start_s) if start_s else max(len(data) - int(end_s or 0), 0)
            end = int(end_s) if (start_s and end_s) else len(data) - 1
            if start >= len(data) and len(data) > 0:
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data, status = data[start : end + 1], 206
        headers["Content-Length"] = str(len(data))
        return self._send(status, data, headers)
