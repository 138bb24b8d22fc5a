"""Shared by the reliability and security tests: tiny run settings, CLI subprocesses killed at a marker line,
folder digests, a real small tmpfs, and a tiny trained run (checkpoint + export) built once per session."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _training_fixtures import TINY_RUN, make_shapes_folder, one_thread, tiny_config  # noqa: F401 (re-exported)


def cli_args(fields: dict[str, Any]) -> list[str]:
    """``--field value`` for every field (None values left out)."""
    return [item for name, value in fields.items() if value is not None for item in (f"--{name}", str(value))]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: offline, one thread, unbuffered output.

    Byte-compiled modules are cached under the temp folder even where PYTHONDONTWRITEBYTECODE is set (as in this
    sandbox), which halves the ~30 s import of torch + transformers + timm in every subprocess after the first.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(Path(tempfile.gettempdir()) / "crossmetric-test-pycache"))
    return env


class Process:
    """A subprocess whose merged stdout/stderr is read by a thread, so a test can wait for a line with a timeout."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.popen = subprocess.Popen(
            argv, env=env or cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.popen.stdout:  # type: ignore[union-attr]
            self._queue.put(line)
        self._queue.put(None)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _take(self, timeout: float) -> bool:
        """Move one line (if any comes within ``timeout``) to ``lines``; False once the output has ended."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            return True
        if line is None:
            self._queue.put(None)  # stays ended
            return False
        self.lines.append(line)
        return True

    def wait_for(self, marker: str, timeout: float = 300) -> None:
        """Block until a line containing ``marker`` appears; fail if the process ends or time runs out first."""
        self.wait_until(lambda: marker in (self.lines[-1] if self.lines else ""), f"line {marker!r}", timeout)

    def wait_until(self, condition: Any, what: str, timeout: float = 300) -> None:
        """Read output until ``condition()`` holds; fail if the process ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s:\n{self.output[-3000:]}")
            if not self._take(timeout=0.02) and not condition():
                raise AssertionError(f"the process ended before {what}:\n{self.output[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no handler, no cleanup, as an OOM killer or a power cut."""
        assert self.popen.poll() is None, f"the process already ended:\n{self.output[-3000:]}"
        self.popen.kill()
        self.popen.wait(timeout=60)

    def finish(self, timeout: float = 300) -> int:
        """Wait for the process to end and read the rest of its output; return its exit code."""
        self.popen.wait(timeout=timeout)
        while self._take(timeout=5):
            pass
        return self.popen.returncode


def run_cli(capsys: Any, *argv: str) -> tuple[int, str]:
    """``crossmetric ARGV`` in this process (one thread); its exit code and stderr, which holds no traceback."""
    from crossmetric.cli import main as cli

    with one_thread():
        code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def start_cli(command: str, args: list[str], **env: str) -> Process:
    return Process([sys.executable, "-m", "crossmetric.cli", command, *args], cli_env(**env))


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative path -> hex digest), to detect any change."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@contextlib.contextmanager
def mounted_tmpfs(directory: Path, size: str, options: str = "") -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``directory`` (unmounted afterwards); skips the test where mount is refused."""
    import pytest

    directory.mkdir(parents=True, exist_ok=True)
    argv = ["mount", "-t", "tmpfs", "-o", f"size={size}{',' + options if options else ''}", "tmpfs", str(directory)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {result.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=30)


_TRAINED: dict[str, Path] = {}


def trained_run(base: Path) -> Path:
    """A finished tiny run under ``base`` (once per session): ``run/checkpoints/checkpoint-{1,2}``, ``run/model``,
    made from a shapes folder at ``base/shapes``. Treat it as read-only: copy what a test changes."""
    if "run" not in _TRAINED:
        from crossmetric.training.trainer import CrossMetricTrainer

        shapes = make_shapes_folder(base / "shapes")
        config = tiny_config(dataset=str(shapes), output_dir=str(base), max_steps=2, save_steps=1, eval_every_epochs=0)
        with one_thread():
            CrossMetricTrainer(config).train().export()  # the caller exports
        _TRAINED["run"] = base / "run"
    return _TRAINED["run"]
