"""``crossmetric evaluate --rerank_top_k``: the model's re-ranker re-scores each query's nearest neighbours, on a real
tiny training run and its export; Recall@1 base, head only, fused and of the training-free control (DIML's structural
similarity) are the brute-force ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _reranker_fixtures import reranking_copy
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


def _diml(e_a: torch.Tensor, t_a: torch.Tensor, e_b: torch.Tensor, t_b: torch.Tensor) -> float:
    """DIML's structural similarity of one pair, written out token by token (the control's reference)."""

    def weighted(tokens: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        descriptor = other.mean(dim=0) if tokens.shape[1] != e_a.shape[0] else None
        total = torch.zeros(tokens.shape[1])
        for token in tokens:
            g = descriptor if descriptor is not None else (e_b if other is t_b else e_a)
            total += max(0.0, float(torch.nn.functional.cosine_similarity(token, g, dim=0))) * token
        return total

    return float(torch.nn.functional.cosine_similarity(weighted(t_a, t_b), weighted(t_b, t_a), dim=0))


def _brute_force(run: Path, shapes: Path, top_k: int, alpha: float) -> dict[str, float]:
    """Recall@1 of the exported embedder, and after re-ranking its top K by the batched head's S^L, by S^L + alpha ·
    cosine, and by the training-free score."""
    model = load_training_checkpoint(run)  # no validation split: the export is the last model
    split = load_dml_dataset(str(shapes), split_strategy="sorted")["test"]
    embeddings, tokens, labels = head_inputs(model, split, 32, torch.device("cpu"), False)
    scores = embeddings @ embeddings.T
    scores.fill_diagonal_(-np.inf)
    hits: dict[str, list[bool]] = {"base": [], "head": [], "fused": [], "free": []}
    with torch.no_grad():
        for q in range(len(labels)):
            order = sorted(range(len(labels)), key=lambda n: (-float(scores[q, n]), n))[:top_k]  # canonical ties
            batch = [q, *order]
            conditional = model.head(embeddings[batch], tokens[batch]).similarities[-1][0, 1:]
            fused = conditional + alpha * scores[q, order]
            free = torch.tensor([_diml(embeddings[q], tokens[q], embeddings[n], tokens[n]) for n in order])
            for name, best in (("base", 0), ("head", conditional.argmax()), ("fused", fused.argmax()),
                               ("free", free.argmax())):  # fmt: skip
                hits[name].append(labels[order[int(best)]] == labels[q])
    return {name: float(np.mean(values)) for name, values in hits.items()}


def test_rerank_on_an_export_reports_base_head_fused_and_training_free(shapes, run, tmp_path, capsys) -> None:
    export = reranking_copy(run / "model", tmp_path / "reranking", alpha=0.5)
    out = tmp_path / "eval"
    rc = _evaluate("--model", str(export), "--dataset", str(shapes), "--output_dir", str(out), "--rerank_top_k", "4")
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    expected = _brute_force(run, shapes, 4, alpha=0.5)
    assert metrics["rerank_top_k"] == 4 and metrics["rerank/reranks"] == 1 and metrics["rerank/alpha"] == 0.5
    assert metrics["rerank/recall@1_base"] == pytest.approx(metrics["recall@1"])
    assert metrics["recall@1"] == pytest.approx(expected["base"])
    assert metrics["rerank/recall@1_head_only"] == pytest.approx(expected["head"])
    assert metrics["rerank/recall@1"] == pytest.approx(expected["fused"])
    assert metrics["rerank/recall@1_training_free"] == pytest.approx(expected["free"])
    assert metrics["rerank/recall@k_ceiling"] >= max(expected.values())
    assert metrics["rerank/ms_per_query"] > 0
    printed = capsys.readouterr().out
    assert "Recall@1 base → re-ranked (fused)" in printed and "training-free" in printed
    report = (out / "report" / "report.md").read_text()
    assert "base → re-ranked" in report and "rerank/recall@1_head_only" in report


def test_rerank_on_a_run_uses_its_reranker_and_an_unfused_one_keeps_the_base(shapes, run, tmp_path) -> None:
    out = tmp_path / "eval"
    rc = _evaluate("--model", str(run), "--dataset", str(shapes), "--output_dir", str(out), "--rerank_top_k", "4")
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    expected = _brute_force(run, shapes, 4, alpha=0.0)
    assert metrics["rerank/reranks"] == 0  # no validation split: the exported re-ranker keeps the embedding's order
    assert metrics["rerank/recall@1"] == metrics["rerank/recall@1_base"] == pytest.approx(expected["base"])
    assert metrics["rerank/recall@1_head_only"] == pytest.approx(expected["head"])
    checkpoint = str(sorted((run / "checkpoints").glob("checkpoint-*"))[-1])
    rc = _evaluate("--model", str(run / "model"), "--checkpoint", checkpoint, "--dataset", str(shapes),
                   "--output_dir", str(tmp_path / "ckpt"), "--rerank_top_k", "4")  # fmt: skip
    assert rc == 0
    from_checkpoint = json.loads((tmp_path / "ckpt" / "metrics.json").read_text())
    assert from_checkpoint["rerank/recall@1_head_only"] == pytest.approx(expected["head"])


@pytest.mark.parametrize("channels", [16, 24])  # tokens as wide as the embedding (DIML's form), or not
def test_the_training_free_control_is_dimls_structural_similarity(channels) -> None:
    from crossmetric.evaluation.structural_similarity import structural_scores

    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(7, 16, generator=generator), dim=1)
    tokens = torch.randn(7, 4, channels, generator=generator)
    neighbours = np.array([[1, 2, 3], [0, 4, 5], [6, 0, 1]])
    got = structural_scores(embeddings, tokens, np.array([0, 3, 2]), neighbours)
    for row, q in enumerate([0, 3, 2]):
        for col, n in enumerate(neighbours[row]):
            expected = _diml(embeddings[q], tokens[q], embeddings[n], tokens[n])
            assert got[row, col] == pytest.approx(expected, abs=1e-5)
