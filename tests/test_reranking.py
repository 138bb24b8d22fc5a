"""``crossmetric evaluate --rerank_top_k``: the head's last-level conditional similarity re-ranks each query's
nearest neighbours, on a real tiny training run; Recall@1 before and after are the brute-force ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_fixtures import make_shapes_folder

from crossmetric.cli.main import main
from crossmetric.data.dml_dataset import load_dml_dataset
from crossmetric.evaluation.reranking import head_inputs
from crossmetric.inference.loading import load_training_checkpoint
from crossmetric.training.config import TrainingConfig
from crossmetric.training.trainer import CrossMetricTrainer

TINY = dict(backbone="test_resnet", embedding_dim=16, cia_dim=16, cia_heads=2, pretrained="none", image_size=64)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_folder(tmp_path_factory.mktemp("data") / "shapes", num_classes=6, per_class=4)


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory) -> Path:
    """A real one-epoch training run with the head (64 px: test_resnet's head tokens are 4×4)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    output = tmp_path_factory.mktemp("runs")
    config = TrainingConfig(dataset=str(shapes), batch_size=6, samples_per_class=2, num_epochs=1, progress=False,
                            split_strategy="sorted", output_dir=str(output), run_name="run", warmup_steps=0,
                            zero_shot_eval=False, **TINY)  # fmt: skip
    CrossMetricTrainer(config).train().export()
    torch.set_num_threads(threads)
    return output / "run"


def _evaluate(*args: str) -> int:
    return main(["evaluate", "--no-progress", "--split_strategy", "sorted", *args])


def _brute_force(run: Path, shapes: Path, top_k: int) -> tuple[float, float]:
    """Recall@1 of the checkpoint's embedder, and after re-ranking its top K by the batched head's S^L."""
    model = load_training_checkpoint(run)
    split = load_dml_dataset(str(shapes), split_strategy="sorted")["test"]
    embeddings, tokens, labels = head_inputs(model, split, 32, torch.device("cpu"), False)
    scores = embeddings @ embeddings.T
    scores.fill_diagonal_(-np.inf)
    before, after = [], []
    with torch.no_grad():
        for q in range(len(labels)):
            order = sorted(range(len(labels)), key=lambda n: (-float(scores[q, n]), n))[:top_k]  # canonical ties
            batch = [q, *order]
            conditional = model.head(embeddings[batch], tokens[batch]).similarities[-1][0, 1:]
            before.append(labels[order[0]] == labels[q])
            after.append(labels[order[int(conditional.argmax())]] == labels[q])
    return float(np.mean(before)), float(np.mean(after))


def test_rerank_reports_recall_at_1_before_and_after(shapes, run, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    rc = _evaluate("--model", str(run), "--dataset", str(shapes), "--output_dir", str(out), "--rerank_top_k", "4")
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    before, after = _brute_force(run, shapes, 4)
    assert metrics["rerank_top_k"] == 4
    assert metrics["recall@1_before_rerank"] == pytest.approx(before)
    assert metrics["recall@1_reranked"] == pytest.approx(after)
    assert metrics["recall@k_rerank_ceiling"] >= max(before, after)
    assert "recall@1_reranked" in capsys.readouterr().out


def test_rerank_needs_a_training_checkpoint(shapes, run, tmp_path, capsys) -> None:
    out = tmp_path / "eval"
    rc = _evaluate("--model", str(run / "model"), "--dataset", str(shapes), "--output_dir", str(out),
                   "--rerank_top_k", "4")  # fmt: skip
    assert rc == 2 and not out.exists()
    assert "--rerank_top_k needs the cross-image-attention head" in capsys.readouterr().err
    rc = _evaluate("--model", str(run / "model"), "--checkpoint", str(run), "--dataset", str(shapes),
                   "--output_dir", str(out), "--rerank_top_k", "4")  # fmt: skip
    assert rc == 0 and "recall@1_reranked" in json.loads((out / "metrics.json").read_text())
