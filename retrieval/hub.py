"""Sharing an :class:`~crossmetric.retrieval.index.EmbeddingIndex` on the Hugging Face Hub.

An index is a folder of files (see :mod:`.storage`), so sharing it is uploading that folder, to the root
of a repo or, with ``path_in_repo="index"``, into the ``index/`` folder of the model's own repo so that the model
and its index travel together. The upload goes through :func:`crossmetric.hub.push.push_to_hub_folder` (its
input checks, token handling and error reporting); the download through ``huggingface_hub.snapshot_download``
restricted to the index files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from .head_tokens import HEAD_TOKENS_FILE
from .storage import EMBEDDINGS_FILE, INDEX_FILE, INDEX_FILE_PATTERNS, METADATA_FILE

DEFAULT_SUBFOLDER = "index"  # where an index lives inside a model folder or model repo
DEFAULT_COMMIT_MESSAGE = "Upload crossmetric embedding index"


def check_path_in_repo(path: str) -> tuple[str, ...]:
    """Split a relative POSIX folder path; refuse absolute paths and ``..`` (it must stay inside the repo)."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or not pure.parts or any(p in ("..", ".") for p in pure.parts) or "\\" in path:
        raise ValueError(f"path_in_repo/subfolder {path!r} must be a relative folder path such as 'index'.")
    return pure.parts


def push_index(
    index: Any, repo_id: str, *, path_in_repo: str | None = None, commit_message: str | None = None, **options: Any
) -> Any:
    """Save ``index`` into a temporary folder laid out as in the repo and upload it in one commit.

    ``options`` are :func:`~crossmetric.hub.push.push_to_hub_folder`'s: ``private``, ``revision``,
    ``create_pr``, ``token``, ``endpoint``.
    """
    from ..hub.push import push_to_hub_folder

    parts = check_path_in_repo(path_in_repo) if path_in_repo else ()
    with tempfile.TemporaryDirectory(prefix="crossmetric-index-") as staging:
        upload = Path(staging, "upload")
        index.save(upload.joinpath(*parts), bind=False)  # the index stays bound to its own folder
        return push_to_hub_folder(upload, repo_id, commit_message=commit_message or DEFAULT_COMMIT_MESSAGE, **options)


def _pick(root: Path, candidates: list[tuple[str, ...]], where: str) -> Path:
    for parts in candidates:
        if (root.joinpath(*parts) / METADATA_FILE).is_file():
            return root.joinpath(*parts)
    looked = " or ".join("/".join((*c, METADATA_FILE)) for c in candidates)
    raise FileNotFoundError(f"{where} holds no embedding index (looked for {looked}).")


def index_folder(
    repo_id_or_dir: str | os.PathLike,
    revision: str | None = None,
    *,
    subfolder: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The local folder holding the index: ``repo_id_or_dir`` itself or its ``index/`` (or ``subfolder``), from
    disk when it is a folder, else downloaded from the Hub (index files only)."""
    parts = check_path_in_repo(subfolder) if subfolder else ()
    candidates = [parts] if subfolder else [(), (DEFAULT_SUBFOLDER,)]
    local = Path(repo_id_or_dir)
    if local.is_dir():
        return _pick(local, candidates, str(local))
    name = os.fspath(repo_id_or_dir)
    if local.exists() or name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        raise FileNotFoundError(f"index {name!r} is not a folder (nor a Hub repo id NAMESPACE/NAME).")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    # format 1's files, and format 2's segment files (items-*.arrow, index-*.faiss, ...): see storage.py
    files = (METADATA_FILE, EMBEDDINGS_FILE, INDEX_FILE, HEAD_TOKENS_FILE, *INDEX_FILE_PATTERNS)
    patterns = ["/".join((*c, f)) for c in candidates for f in files]
    try:
        snapshot = snapshot_download(
            name, revision=revision, allow_patterns=patterns, token=token, cache_dir=cache_dir, repo_type="model"
        )
    except (HfHubHTTPError, HFValidationError, LocalEntryNotFoundError) as error:
        raise FileNotFoundError(
            f"index {name!r}: no such local folder, and downloading it from the Hub failed: {error}"
        ) from error
    return _pick(Path(snapshot), candidates, f"Hub repo {name!r}")
