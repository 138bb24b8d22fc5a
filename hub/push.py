"""Share an exported model folder on the Hugging Face Hub (the ``crossmetric push`` command is ``cli/push.py``).

:func:`push_to_hub_folder` checks its inputs before any network call, then goes through
``huggingface_hub.HfApi``: ``create_repo(exist_ok=True)``, ``create_branch`` when a branch other than
``main`` is named, and ``upload_folder`` (one commit, optionally as a pull request). The endpoint
comes from the argument, else ``HF_ENDPOINT``; the token from the argument, else ``HF_TOKEN`` or the
``hf auth login`` token file (``huggingface_hub.get_token``). The token is only handed to ``HfApi``,
which sends it as the ``Authorization`` header: this module never prints, logs or writes it, and
strips it from error messages just in case a server echoes it.

Server and network failures (after ``huggingface_hub``'s own retries) become :class:`HubPushError`
with the HTTP status; the local folder is only read, never changed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import httpx2
from huggingface_hub import CommitInfo, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from ..inference.loading import check_repo_id

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload crossmetric model"
# Characters git refuses in branch names (git check-ref-format), plus whitespace.
_BAD_REF_CHARS = set(" \t\n\r~^:?*[\\\x7f")


class HubPushError(RuntimeError):
    """The Hub (or the network on the way) refused or broke a push; ``status`` is the HTTP status if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def check_revision(revision: object) -> str | None:
    """Return a branch name usable as ``revision`` (None means ``main``), else raise ValueError."""
    if revision is None:
        return None
    hint = "Pass a branch name such as 'main' or 'experiment-1'."
    if not isinstance(revision, str) or not revision.strip():
        raise ValueError(f"revision must be a non-empty branch name, got {revision!r}. {hint}")
    bad = sorted(_BAD_REF_CHARS & set(revision))
    if (
        bad
        or "\x00" in revision
        or ".." in revision
        or "//" in revision
        or revision.startswith(("/", "-", "."))
        or revision.endswith(("/", ".", ".lock"))
        or revision.startswith("refs/")
    ):
        raise ValueError(f"revision {revision!r} is not a valid branch name. {hint}")
    return revision


def _check_folder(folder: str | os.PathLike[str]) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"folder {str(path)!r} is not a directory: pass the folder an export wrote.")
    if not any(p.is_file() for p in path.rglob("*") if ".git" not in p.relative_to(path).parts):
        raise ValueError(f"folder {str(path)!r} holds no files to upload.")
    return path


def _redact(text: str, token: str) -> str:
    return text.replace(token, "***") if token else text


def _status_of(err: BaseException) -> int | None:
    """The HTTP status behind an exception (following ``__cause__``/``__context__``), if any."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
        current = current.__cause__ or current.__context__
    return None


def push_to_hub_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> CommitInfo:
    """Upload every file of ``folder`` to the model repo ``repo_id`` in one commit; return the commit.

    The returned ``CommitInfo`` is a ``str`` (the commit URL) with ``.oid``, and ``.pr_url`` /
    ``.pr_revision`` when ``create_pr`` opened a pull request (against ``main``). ``private`` applies
    when the repo is created; an existing repo keeps its visibility. ``revision`` names a branch,
    created from ``main`` if missing.

    Raises:
        ValueError: bad ``repo_id``, ``revision``, ``folder``, or ``create_pr`` with a branch.
        HubPushError: no token, or the Hub / network failed (``.status`` holds the HTTP status).
    """
    check_repo_id(repo_id)
    revision = check_revision(revision)
    if create_pr and revision not in (None, constants.DEFAULT_REVISION):
        raise ValueError(
            f"create_pr=True opens a pull request against 'main'; drop revision={revision!r} or create_pr."
        )
    path = _check_folder(folder)
    token = token or get_token()
    if not token:
        raise HubPushError("No Hugging Face token found: set HF_TOKEN or run `hf auth login`.")
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision not in (None, constants.DEFAULT_REVISION):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            folder_path=path,
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or DEFAULT_COMMIT_MESSAGE,
        )
    except (HfHubHTTPError, httpx2.HTTPError, OfflineModeIsEnabled, RuntimeError, ValueError) as err:
        status = _status_of(err)
        what = f"HTTP {status}" if status is not None else type(err).__name__
        raise HubPushError(
            _redact(f"Pushing {str(path)!r} to {repo_id!r} at {endpoint} failed ({what}): {err}", token), status
        ) from err
    logger.info("Pushed %s to %s: %s", path, repo_id, commit.commit_url)
    if commit.pr_url:
        logger.info("Opened pull request %s", commit.pr_url)
    return commit


# The root package exports this module's entry point as `crossmetric.push_to_hub`.
push_to_hub = push_to_hub_folder
