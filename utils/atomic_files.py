"""Atomic file and folder writes: a reader sees the old content or the new one, never a half-written file.

Every writer of the package goes through these two helpers instead of hand-rolling temporary names and
``os.replace``:

* :func:`write_atomic` writes one file (``str``, ``bytes``, or a callback that writes to a given path, e.g.
  ``safetensors``' ``save_file``) to a temporary sibling, fsyncs it and renames it over the target.
* :func:`staged_directory` yields a temporary sibling folder to fill; on success it is swapped into place with
  ``modeling_crossmetric.replace_directory`` (which stays in ``modeling/``: that package is standalone Hub
  remote code and cannot import from here); on failure it is removed and the previous folder is untouched.

Training checkpoints keep their own fsync'd swap with tested fault points (``training/checkpointing.py``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

Content = str | bytes | Callable[[Path], object]


def write_atomic(path: str | os.PathLike, content: Content, *, encoding: str = "utf-8") -> Path:
    """Write ``content`` to ``path`` atomically and return ``path``.

    ``content`` is text (written with ``encoding`` and ``\\n`` line ends), bytes, or a callable that writes the
    file at the temporary path it is given. Missing parent folders are created. The file is fsynced before the
    rename, so that a crash leaves either the previous file or the complete new one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    temporary = Path(name)
    try:
        if callable(content):
            os.close(handle)
            content(temporary)
            with open(temporary, "rb+") as stream:
                os.fsync(stream.fileno())
        else:
            data = content.encode(encoding) if isinstance(content, str) else bytes(content)
            with os.fdopen(handle, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)  # mkstemp makes the file private; written files are meant to be shared
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of folder ``path``; swap it into ``path`` when the block succeeds.

    ``with staged_directory(out) as staging: ...write files into staging...`` leaves ``out`` either as it was
    (the block raised: the staging folder is removed) or replaced as a whole by the new content.
    """
    from ..modeling.modeling_crossmetric import replace_directory

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{str(target)!r} is a file; pass a folder path to write into.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; outputs are meant to be shared
        yield staging
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_writable(directory: Path, flag: str = "--output_dir") -> None:
    """Refuse an output directory that cannot be created or written, without creating anything (a refused
    configuration leaves nothing behind): probe the nearest existing ancestor with a temporary file."""
    existing = Path(directory)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise ValueError(
            f"{flag}: cannot write to {directory} ({error.strerror}: {existing}); choose a writable {flag}."
        ) from error
