"""The shape of the code: the layers of docs/design.md §2 (import-linter's contract in pyproject.toml), no import cycle
among the package's modules, no file over 400 lines.

Imports inside functions count too (a lazy import is still a dependency), as do relative imports.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = (
    "modeling", "utils", "data", "inference", "evaluation", "model_cards", "training", "hub", "retrieval", "serve",
    "cli",
)  # fmt: skip


def package_modules() -> dict[str, Path]:
    modules = {"crossmetric": ROOT / "__init__.py"}
    for folder in PACKAGE_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            if "evaluate_metric" in path.parts:  # loaded by `evaluate` from its folder, not imported by the package
                continue
            name = ".".join(["crossmetric", *path.relative_to(ROOT).with_suffix("").parts])
            modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = parts[: len(parts) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target, *(f"{target}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {c for c in candidates if c in modules and c != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_package_keeps_to_its_layer() -> None:
    """`lint-imports` (as .ci/run runs it): each top-level package imports only from the layers below it."""
    if shutil.which("lint-imports") is None:
        pytest.skip("import-linter is not installed (pip install -e '.[dev]')")
    done = subprocess.run(["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def test_every_top_level_package_is_a_layer() -> None:
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(PACKAGE_FOLDERS)


def test_no_import_cycle_among_the_package_modules() -> None:
    modules = package_modules()
    assert len(modules) > 50
    assert cycles(import_graph(modules)) == []


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_python_file_over_400_lines() -> None:
    long = {}
    for path in ROOT.rglob("*.py"):
        if {".git", "node_modules", ".venv", "build"} & set(path.parts):
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > 400:
            long[str(path.relative_to(ROOT))] = lines
    assert long == {}
