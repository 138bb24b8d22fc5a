"""Issue 29: the transfer stops where the head ranks validation no better than the embedding; the head's token grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_fixtures import make_shapes_folder, one_thread, tiny_config

from crossmetric.evaluation.rerank_fusion import CandidateScores
from crossmetric.modeling.modeling_crossmetric import CrossMetricForMetricLearning
from crossmetric.training.losses.registry import objective_from_config
from crossmetric.training.recipes import fit_recipe
from crossmetric.training.token_grid import head_token_grid, head_token_note
from crossmetric.training.trainer import CrossMetricTrainer
from crossmetric.training.transfer_gate import RECORD, TransferGate, check_scores


def _scores(head_first: list[int]) -> CandidateScores:
    """4 queries, 2 candidates each; the embedding ranks the right one first for queries 0 and 1 only. The head scores
    candidate ``head_first[q]`` of query q highest."""
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 9, 9])
    neighbours = np.array([[4, 8], [5, 9], [8, 6], [9, 7]])  # right: column 0, 0, 1, 1
    head = np.zeros((4, 2), dtype=np.float32)
    head[np.arange(4), head_first] = 1.0
    return CandidateScores(np.arange(4), neighbours, head, np.ones((4, 2), np.float32), labels)


def test_the_rules_stop_the_transfer_where_the_head_ranks_no_better_or_is_not_catching_up() -> None:
    better = check_scores(_scores([0, 0, 1, 1]), step=7)  # the head finds all 4, the embedding 2
    assert (better.head_recall, better.embedding_recall, better.candidates) == (1.0, 0.5, 2)
    assert better.fused_recall == 1.0  # the best fusion of head and cosine on the same candidates
    assert not better.no_better and not better.verdict("head_no_better")
    worse = check_scores(_scores([1, 1, 0, 0]), step=7)  # the head finds none
    assert worse.head_recall == 0.0 and worse.verdict("head_no_better") and not worse.stop
    tie = check_scores(_scores([0, 1, 1, 0]), step=7)  # 2 of 4 each: no better, so it stops
    assert tie.head_recall == tie.embedding_recall == 0.5 and tie.verdict("head_no_better")
    # head_not_catching_up: never at the first check; behind and gaining goes on; behind and not gaining stops
    assert not tie.verdict("head_not_catching_up")
    assert not check_scores(_scores([0, 1, 1, 0]), step=9, previous_lead=-0.25).verdict("head_not_catching_up")
    assert check_scores(_scores([0, 1, 1, 0]), step=9, previous_lead=0.0).verdict("head_not_catching_up")
    assert not check_scores(_scores([0, 0, 1, 1]), step=9, previous_lead=0.75).verdict("head_not_catching_up")
    assert not worse.verdict("watch") and not worse.verdict("never")


def _check(step: int, head: float, embedding: float, stopped: bool = False) -> dict:
    return {"step": step, RECORD: {"head_recall@1": head, "embedding_recall@1": embedding, "stopped": stopped}}


def test_the_gate_is_due_after_the_warmup_only_and_a_resume_restores_a_stop() -> None:
    config = tiny_config(cia_distill_weight=5.0, cia_distill_warmup_steps=4, cia_distill_stop="head_no_better")
    objective = objective_from_config(config)
    with_head, head_off = (CrossMetricForMetricLearning(tiny_config(cia_levels=n).model_config()) for n in (1, 0))
    gate = TransferGate(config, objective, with_head, selection_split="validation")
    assert [gate.due(step, total_steps=10) for step in (0, 3, 4, 9, 10)] == [False, False, True, True, False]
    shuffled = CrossMetricForMetricLearning(tiny_config(cia_query="shuffled").model_config())
    for inactive in (
        TransferGate(config, objective, shuffled, selection_split="validation"),
        TransferGate(config, objective, with_head, selection_split=None),
        TransferGate(config, objective, head_off, selection_split="validation"),
        TransferGate(tiny_config(cia_distill_weight=5.0, cia_distill_stop="never"), objective, with_head, "validation"),
    ):
        assert not inactive.due(5, 10)
    gate.restore([_check(4, 0.5, 0.25)])
    assert objective.distillation is not None and gate.due(5, 10) and gate.previous_lead == 0.25
    gate.restore([_check(4, 0.5, 0.25), _check(6, 0.25, 0.5, stopped=True)])
    assert gate.stopped_at == 6 and objective.distillation is None and objective.distill_weight == 0.0
    assert not gate.due(8, 10)
    watching = tiny_config(cia_distill_weight=5.0, cia_distill_warmup_steps=4, cia_distill_stop="watch")
    watch = TransferGate(watching, objective, with_head, "validation")
    assert watch.due(5, 10)
    record = watch.decide(check_scores(_scores([1, 1, 0, 0]), step=5, previous_lead=0.5)).as_record()
    assert record["head_no_better"] and record["head_not_catching_up"] and not record["stopped"]  # logged only
    record = gate.decide(check_scores(_scores([1, 1, 0, 0]), step=5)).as_record()
    assert record["stopped"] and "no better than the embedding" in record["reason"]


def test_the_fine_tuning_recipe_watches_the_head_and_the_main_job_does_not(tmp_path) -> None:
    labels = [i // 6 for i in range(48)]
    for fields, expected in (({}, "watch"), ({"dataset": "glyphs"}, "never"), ({"cia_distill_stop": "head_no_better"},
                             "head_no_better")):  # fmt: skip
        config = tiny_config(**{"dataset": str(tmp_path), **fields})
        fit_recipe(config, labels)
        assert config.cia_distill_stop == expected, fields
    with pytest.raises(ValueError, match="--cia_distill_stop='sometimes': head_no_better, head_not_catching_up, watch"):
        tiny_config(cia_distill_stop="sometimes").validate()


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_a_run_whose_head_ranks_no_better_stops_the_transfer_and_the_log_and_card_say_why(tmp_path) -> None:
    """A head that cannot learn (learning rate ~0: it stays random) re-ranks validation below the trained embedding:
    at the first check after the warm-up the transfer stops; until then the run is the run without the rule, step by
    step (the check draws no random numbers), and from then on it computes no transfer term."""
    shapes = make_shapes_folder(tmp_path / "shapes", num_classes=16, per_class=4)
    common = dict(
        dataset=str(shapes), num_epochs=3, eval_every_epochs=1, cia_distill_weight=10.0, cia_distill_top_k=3,
        cia_distill_warmup_steps=2, head_learning_rate=1e-12, validation_fraction=0.25, reranker_top_k=5,
    )  # fmt: skip
    runs = {}
    for rule in ("head_no_better", "never"):
        with one_thread():
            trainer = CrossMetricTrainer(tiny_config(output_dir=str(tmp_path / rule), cia_distill_stop=rule, **common))
            runs[rule] = trainer.train()
    log = _log(runs["head_no_better"].run_directory)
    checks = [r for r in log if RECORD in r]
    assert len(checks) == 1, checks  # the first check stops it; no check after
    stop = checks[0]
    assert stop[RECORD]["stopped"] and stop[RECORD]["head_recall@1"] <= stop[RECORD]["embedding_recall@1"]
    assert stop[RECORD]["candidates"] == 5
    steps = [r for r in log if "loss" in r]
    assert all("distill_loss" in r for r in steps if r["step"] <= stop["step"])
    assert all("distill_loss" not in r for r in steps if r["step"] > stop["step"])
    assert any(r["step"] > stop["step"] for r in steps)
    without_rule = [r for r in _log(runs["never"].run_directory) if "loss" in r]
    assert not [r for r in _log(runs["never"].run_directory) if RECORD in r]
    before = [(r["step"], r["loss"]) for r in steps if r["step"] <= stop["step"]]
    assert before == [(r["step"], r["loss"]) for r in without_rule if r["step"] <= stop["step"]]
    export = runs["head_no_better"].export()
    card = " ".join((export / "README.md").read_text().split())
    assert f"The transfer stopped at step {stop['step']} (its weight was 0 from then on)" in card
    assert "no better than the embedding" in card
    assert "The transfer stopped" not in " ".join((runs["never"].export() / "README.md").read_text().split())


@pytest.mark.parametrize(
    ("image_size", "stride", "grid", "stage", "channels"),
    [
        (64, 16, [4, 4], "blocks.4", 112),
        (112, 16, [7, 7], "blocks.4", 112),
        (224, 32, [7, 7], None, 1280),
        (64, 0, [2, 2], None, 1280),
    ],
)
def test_the_head_token_grid_follows_the_input_size_and_the_stage(image_size, stride, grid, stage, channels) -> None:
    """lite0 (random weights): 4×4 tokens at 64 px from the stride-16 stage, 7×7 at 112 px; 7×7 from the last map at
    224 px (stride 32), 2×2 at 64 px."""
    from crossmetric import CrossMetricConfig

    config = CrossMetricConfig(
        backbone="tf_efficientnet_lite0", image_size=image_size, cia_levels=1, cia_token_stride=stride
    )
    with one_thread():
        model = CrossMetricForMetricLearning(config).train()
        info = head_token_grid(model)
    assert info["grid"] == grid and info["tokens"] == grid[0] * grid[1] and info["channels"] == channels
    assert model.head_token_stage == stage and info["stage"] == (stage or "the last feature map")
    assert model.training  # measured in eval mode, put back
    note = head_token_note(model)
    assert (
        note.startswith(f"head tokens: {grid[0]}×{grid[1]} = {grid[0] * grid[1]} per image")
        and f"{image_size} px" in note
    )


def test_a_head_off_model_has_no_token_grid() -> None:
    model = CrossMetricForMetricLearning(tiny_config(cia_levels=0).model_config())
    assert head_token_grid(model) is None and head_token_note(model) is None
    assert torch.is_grad_enabled()


def test_watching_the_head_changes_nothing_in_the_run(tmp_path) -> None:
    """``watch`` runs the same checks as the rules at every evaluation and acts on nothing: the run is the one without
    checks, step for step (the checks draw no random numbers and leave the model in training mode)."""
    shapes = make_shapes_folder(tmp_path / "shapes", num_classes=16, per_class=4)
    common = dict(
        dataset=str(shapes), num_epochs=3, eval_every_epochs=1, cia_distill_weight=10.0, cia_distill_top_k=3,
        cia_distill_warmup_steps=2, validation_fraction=0.25, reranker_top_k=5, export=False,
    )  # fmt: skip
    logs = {}
    for rule in ("watch", "never"):
        with one_thread():
            result = CrossMetricTrainer(
                tiny_config(output_dir=str(tmp_path / rule), cia_distill_stop=rule, **common)
            ).train()
        logs[rule] = _log(result.run_directory)
    checks = [r for r in logs["watch"] if RECORD in r]
    assert len(checks) >= 2 and not any(r[RECORD]["stopped"] for r in checks)
    assert [r for r in logs["watch"] if RECORD not in r] == logs["never"]
