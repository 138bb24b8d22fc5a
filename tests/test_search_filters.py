"""``crossmetric search --filter`` on an index built from a dataset with ``--metadata_columns``, through the CLI.

The gallery is a ``datasets`` dataset saved to disk with a string column, an integer column and a column whose values
hold a comma; the build runs in shards of 5 (row-number ids must run on across shards).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _retrieval_fixtures import export_tiny_model, make_class_folder

from crossmetric.cli import main as cli
from crossmetric.retrieval.filter_spec import parse_filter_specs
from crossmetric.retrieval.index import EmbeddingIndex

COLORS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    import datasets

    base = tmp_path_factory.mktemp("filters")
    model = export_tiny_model(base / "model")
    folder = make_class_folder(base / "images", classes=3, per_class=4)
    files = sorted(str(p) for p in folder.rglob("*.png"))
    rows = {
        "image": files,
        "label": [Path(f).parent.name for f in files],
        "color": [COLORS[i % 3] for i in range(12)],
        "year": [2020 if i < 4 else 2021 for i in range(12)],
        "maker": ["Smith, J." if i in (5, 9) else "Doe" for i in range(12)],
    }
    dataset = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(base / "dataset"))
    index = base / "index"
    argv = ["index", "build", "--model", str(model), "--images", str(base / "dataset"), "--output_dir", str(index)]
    argv += ["--metadata_columns", "color", "year", "maker", "--shard_size", "5", "--device", "cpu", "--no-progress"]
    assert cli.main(argv) == 0
    return {"base": base, "model": model, "index": index, "query": files[0], "rows": rows}


def _search(setup: dict, capsys, *filters: str, top_k: int = 12) -> tuple[int, list[str], str]:
    argv = ["search", "--model", str(setup["model"]), "--index", str(setup["index"]), str(setup["query"]), "--json"]
    argv += ["--top_k", str(top_k), "--device", "cpu"] + [item for f in filters for item in ("--filter", f)]
    capsys.readouterr()
    code = cli.main(argv)
    out, err = capsys.readouterr()
    ids = [hit["id"] for hit in json.loads(out.splitlines()[0])["results"]] if code == 0 else []
    return code, ids, err


def test_the_metadata_columns_are_kept_and_ids_run_on_across_shards(setup: dict) -> None:
    index = EmbeddingIndex.load(setup["index"])
    assert index.ids == [str(i) for i in range(12)]  # 3 shards of 5, 5, 2 rows
    assert index.metadata_columns == ["color", "year", "maker"]
    # save_to_disk embeds the image bytes and keeps the file name as the path
    assert index.records(["7"]) == [
        {"id": "7", "label": setup["rows"]["label"][7], "path": Path(setup["rows"]["image"][7]).name,
         "color": "green", "year": 2021, "maker": "Doe"}
    ]  # fmt: skip


def test_filters_or_within_and_across_with_typed_and_escaped_values(setup: dict, capsys) -> None:
    code, ids, err = _search(setup, capsys, "color=red")
    assert code == 0, err
    assert sorted(ids, key=int) == ["0", "3", "6", "9"]
    code, ids, _ = _search(setup, capsys, "color=red,blue", "year=2020")  # (red or blue) and 2020
    assert sorted(ids, key=int) == ["0", "2", "3"]
    code, ids, _ = _search(setup, capsys, r"maker=Smith\, J.", top_k=5)  # the comma inside a value, escaped
    assert sorted(ids, key=int) == ["5", "9"]
    code, ids, _ = _search(setup, capsys, "year=2021", "color=green", top_k=1)
    assert code == 0 and len(ids) == 1 and ids[0] in {"4", "7", "10"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("shape=round", "--filter 'shape': the index has no such column"),
        ("year=soon", "the column holds int64 values"),
        ("color", "write COLUMN=VALUE[,VALUE...]"),
        ("color=red,", "empty value"),
    ],
)
def test_bad_filters_exit_2_naming_the_problem(setup: dict, capsys, spec: str, message: str) -> None:
    code, _, err = _search(setup, capsys, spec)
    assert code == 2 and message in err and "Traceback" not in err


def test_metadata_columns_need_a_dataset_gallery(setup: dict, tmp_path: Path, capsys) -> None:
    images = make_class_folder(tmp_path / "images", classes=1, per_class=2)
    argv = ["index", "build", "--model", str(setup["model"]), "--images", str(images), "--output_dir"]
    assert cli.main([*argv, str(tmp_path / "x"), "--metadata_columns", "color"]) == 2
    assert "--metadata_columns needs a dataset gallery" in capsys.readouterr().err
    argv = ["index", "build", "--model", str(setup["model"]), "--images", str(setup["base"] / "dataset")]
    assert cli.main([*argv, "--output_dir", str(tmp_path / "y"), "--metadata_columns", "colour"]) == 2
    assert "--metadata_columns ['colour']: not columns of" in capsys.readouterr().err


def test_specs_on_one_column_are_intersected() -> None:
    assert parse_filter_specs(["label=a,b", "label=b,c", "x=1"]) == {"label": ["b"], "x": ["1"]}
    assert parse_filter_specs([r"path=a\\b,c\,d"]) == {"path": ["a\\b", "c,d"]}
    assert parse_filter_specs([]) is None
