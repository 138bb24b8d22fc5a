"""``crossmetric train --config inshop --data_dir D`` on a real In-Shop layout (a small fixture, official files).

The recipe's heavy parts (backbone, image size, epochs) are overridden; what is checked is the protocol: the test
metrics are query vs gallery with In-Shop's K (1, 10, ..., 50) and the model is selected on a validation split carved
from the train items, never on the query/gallery test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _fixtures import make_inshop

from crossmetric.cli.main import main

QUERY_GALLERY_KEYS = {f"recall@{k}" for k in (1, 10, 20, 30, 40, 50)} | {"map@r", "r_precision", "nmi"}
OVERRIDES = {
    "--backbone": "test_resnet",
    "--pretrained": "none",
    "--image_size": "32",
    "--embedding_dim": "16",
    "--cia_dim": "16",
    "--cia_heads": "2",
    "--batch_size": "8",
    "--samples_per_class": "2",
    "--num_epochs": "1",
    "--eval_batch_size": "32",
    "--mixed_precision": "no",
    "--progress": "False",
}


@pytest.mark.parametrize("n_train, selection", [(10, "validation"), (5, None)])
def test_train_inshop_recipe_writes_query_gallery_metrics(tmp_path: Path, n_train: int, selection: str | None) -> None:
    """10 train items: 2 held out (validation_fraction 0.2) select the model; 5 are too few to hold out 2 (the minimum),
    so the last model is exported."""
    data = make_inshop(tmp_path / "inshop", n_train=n_train, n_test=6, per_item=3)
    output = tmp_path / "runs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = ["train", "--config", "inshop", "--data_dir", str(data), "--output_dir", str(output)]
        args += ["--run_name", "run", *[part for item in OVERRIDES.items() for part in item]]
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((output / "run" / "summary.json").read_text())
    assert set(summary["final"]) == QUERY_GALLERY_KEYS
    assert all(0.0 <= summary["final"][key] <= 1.0 for key in QUERY_GALLERY_KEYS)
    assert summary["selection_split"] == selection
    if selection is not None:
        assert summary["best"] is not None and summary["validation"]
    assert (output / "run" / "model" / "config.json").is_file()
    exported = json.loads((output / "run" / "model" / "metrics.json").read_text())
    assert exported["recall@50"] == pytest.approx(summary["final"]["recall@50"])
