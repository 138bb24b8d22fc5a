"""The milvus extra is optional: without pymilvus, ``--milvus`` and ``MilvusIndex`` say which extra to install, and
nothing else needs it (these tests run whether or not the extra is installed: they hide it)."""

from __future__ import annotations

import sys

import pytest

from crossmetric.cli.main import main
from crossmetric.retrieval.milvus_expressions import filter_expression, ids_expression

HINT = 'pip install "crossmetric[milvus]"'


@pytest.fixture
def no_pymilvus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # `import pymilvus` now raises ImportError


def test_milvus_index_names_the_extra_without_pymilvus(no_pymilvus: None, tmp_path) -> None:
    from crossmetric.retrieval.milvus_index import MilvusIndex

    with pytest.raises(ImportError, match=r"pip install \"crossmetric\[milvus\]\""):
        MilvusIndex(str(tmp_path / "gallery.db"), "mine")


@pytest.mark.parametrize(
    "command",
    [
        ["index", "build", "--model", "m", "--images", "i"],
        ["index", "info"],
        ["index", "remove", "--ids", "a"],
        ["search", "--model", "m", "q.jpg"],
    ],
)
def test_every_milvus_flag_names_the_extra_without_pymilvus(no_pymilvus: None, tmp_path, capsys, command) -> None:
    assert main([*command, "--milvus", str(tmp_path / "gallery.db"), "--collection", "mine"]) == 2
    assert HINT in capsys.readouterr().err


def test_milvus_flags_are_checked_before_any_work(tmp_path, capsys) -> None:
    target = ["index", "build", "--model", "m", "--images", "i"]
    assert main([*target, "--milvus", str(tmp_path / "gallery.db")]) == 2
    assert "--milvus needs --collection" in capsys.readouterr().err
    assert main([*target, "--milvus", str(tmp_path / "gallery.txt"), "--collection", "c"]) == 2
    assert "pass a Milvus Lite file ending in .db" in capsys.readouterr().err
    assert main([*target, "--milvus", str(tmp_path / "no" / "g.db"), "--collection", "c"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*target, "--output_dir", str(tmp_path / "x"), "--milvus", "http://h:1", "--collection", "c"]) == 2
    assert "either --output_dir or --milvus" in capsys.readouterr().err
    assert main(["index", "build", "--model", "m", "--images", "i"]) == 2
    assert "pass --output_dir, or --milvus URI --collection NAME" in capsys.readouterr().err


def test_filters_and_ids_become_quoted_expressions() -> None:
    columns = ["label", "path", "year", "ok"]
    assert filter_expression({"label": ['a"b]', "it's"], "year": [2020], "ok": [True, None]}, columns) == (
        '(label in ["a\\"b]", "it\'s"]) and (year in [2020]) and ((ok in [true] or ok is null))'
    )
    assert filter_expression({"label": []}, columns) == "(false)"
    assert ids_expression(["x\\y", "new\nline"]) == 'id in ["x\\\\y", "new\\nline"]'
    with pytest.raises(ValueError, match="'colour' is not a column of the index"):
        filter_expression({"colour": ["red"]}, columns)
    with pytest.raises(ValueError, match="NUL byte"):
        filter_expression({"label": ["a\x00"]}, columns)
    with pytest.raises(ValueError, match="must be a list of allowed values"):
        filter_expression({"label": "cats"}, columns)
