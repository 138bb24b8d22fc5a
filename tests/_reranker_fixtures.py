"""Real tiny runs for the re-ranker tests: one with the head (its export ships ``reranker/``), one with it off."""

from __future__ import annotations

import shutil
from pathlib import Path

from _training_fixtures import make_shapes_folder, one_thread, tiny_config

from crossmetric import EmbeddingIndex, RerankFeatures
from crossmetric.modeling.reranking_crossmetric import CrossMetricReranker


def train_runs(root: Path) -> dict[str, Path]:
    """``shapes`` (16 classes × 4 images), ``run`` (2 epochs with the head on detached tokens, a validation split, a
    re-ranker chosen there and an export) and ``off`` (the head off, exported)."""
    from crossmetric.training.trainer import CrossMetricTrainer

    shapes = make_shapes_folder(root / "shapes", num_classes=16, per_class=4)
    common = {"dataset": str(shapes), "output_dir": str(root / "runs"), "zero_shot_eval": False}
    with one_thread():
        head = tiny_config(**common, num_epochs=2, cia_detach=True, reranker_top_k=5, validation_fraction=0.25)
        CrossMetricTrainer(head).train().export()
        off = tiny_config(**common, run_name="off", num_epochs=1, cia_levels=0)
        CrossMetricTrainer(off).train().export()
    runs = root / "runs"
    return {"shapes": shapes, "run": runs / "run", "off": runs / "off"}


def reranking_copy(export: Path, target: Path, alpha: float = 0.5) -> Path:
    """A copy of ``export`` whose re-ranker re-ranks (``reranks`` True, ``alpha``): the tiny run's validation split
    is too easy for re-ranking to beat the embedding there, and the fused score should be exercised too."""
    shutil.copytree(export, target)
    reranker = CrossMetricReranker.from_pretrained(target / "reranker")
    reranker.config.reranks, reranker.config.alpha = True, alpha
    reranker.save_pretrained(target / "reranker")
    return target


def gallery_images(shapes: Path) -> list[Path]:
    """The shapes' image files, sorted."""
    return sorted(shapes.rglob("*.png"))


def expected_rerank_order(index: EmbeddingIndex, export: Path, query: Path, k: int, top: int) -> tuple[list, list]:
    """The ids the first ``k`` hits should have (``rank()`` on what ``index`` stores for the embedding's ``k``
    nearest) and the embedding's own order up to ``top``: what every re-ranking search path must agree with."""
    reranker = CrossMetricReranker.from_pretrained(export / "reranker")
    features = reranker.encode([query])
    _, rows = index.search_arrays(features.embeddings.numpy(), top)
    head = rows[0][:k]
    stored = RerankFeatures(index.embeddings[head], index.head_tokens.tokens[head])
    ranking = reranker.rank(RerankFeatures(features.embeddings[0], features.tokens[0]), stored)
    return [index.ids[head[h["corpus_id"]]] for h in ranking], [index.ids[r] for r in rows[0]]
