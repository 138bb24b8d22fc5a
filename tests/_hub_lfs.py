"""The test Hub's errors and its Git LFS transfer endpoints (batch, presigned-style upload, verify)."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from _hub_store import Repo


class HubError(Exception):
    """An error answer: HTTP status, message, and the Hub's ``X-Error-Code`` when it has one."""

    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.commit = status, message, code, commit


class LfsTransfers:
    """Mixed into the request handler: it provides ``hub``, ``_json`` and ``_send``."""

    hub: Any

    def _lfs_batch(self, repo: Repo, payload: dict) -> None:
        if payload.get("operation") != "upload":
            raise HubError(422, "Only uploads are served by the test Hub")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], int(obj["size"])
            item: dict = {"oid": oid, "size": size, "authenticated": True}
            if self.hub.store.lfs_entry(repo, oid) is None:
                # Like a presigned S3 URL: the client PUTs there without its token.
                key = secrets.token_urlsafe(16)
                self.hub.lfs_uploads[key] = (repo.repo_type, repo.repo_id, oid, size)
                verify = f"{self.hub.url}/{repo.url_path}.git/info/lfs/objects/verify"
                item["actions"] = {
                    "upload": {"href": f"{self.hub.url}/_lfs_upload/{key}", "header": {}},
                    "verify": {"href": verify, "header": {}},
                }
            objects.append(item)
        return self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _lfs_put(self, key: str, body: bytes) -> None:
        if key not in self.hub.lfs_uploads:
            raise HubError(403, "Unknown or used upload URL")
        repo_type, repo_id, oid, size = self.hub.lfs_uploads.pop(key)
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} / size {size}")
        repo = self.hub.store.get(repo_type, repo_id)
        assert repo is not None
        path = self.hub.store.lfs_object_path(repo, oid)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".part")
        tmp.write_bytes(body)
        tmp.replace(path)
        return self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})

    def _lfs_verify(self, repo: Repo, body: bytes) -> None:
        payload = json.loads(body)
        entry = self.hub.store.lfs_entry(repo, payload["oid"])
        if entry is None or entry.size != int(payload["size"]):
            raise HubError(404, f"LFS object {payload['oid']} not found or wrong size")
        return self._json({"success": True})
