"""The transfer from the head to the embedding (issue 20): distillation forms, a detached head, and their guarantees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _training_fixtures import make_shapes_folder, one_thread, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file

from crossmetric.training.losses.head_distillation import HeadDistillationLoss
from crossmetric.training.losses.registry import objective_from_config
from crossmetric.training.trainer import CrossMetricTrainer


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_folder(tmp_path_factory.mktemp("data") / "shapes")


def _batch(seed: int = 0, batch: int = 8, levels: int = 2):
    generator = torch.Generator().manual_seed(seed)
    embeddings = F.normalize(torch.randn(batch, 6, generator=generator), dim=1).requires_grad_()
    labels = torch.arange(batch) // 2
    teachers = []
    for _ in range(levels):
        states = torch.randn(batch, 5, generator=generator, requires_grad=True)
        teachers.append((F.normalize(states, dim=1) @ F.normalize(states, dim=1).T, states))
    return embeddings, labels, teachers


@pytest.mark.parametrize("form", ["kl", "listwise", "margin_mse"])
def test_the_teacher_gets_no_gradient_from_the_transfer_and_the_student_does(form) -> None:
    embeddings, labels, teachers = _batch()
    teacher, teacher_states = teachers[-1]
    loss = HeadDistillationLoss(form, temperature=0.5, top_k=3)(embeddings @ embeddings.T, teacher, labels)
    loss.backward()
    assert teacher_states.grad is None
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_the_kl_is_zero_when_student_equals_teacher_and_positive_otherwise() -> None:
    embeddings, labels, _ = _batch()
    student = embeddings @ embeddings.T
    for form in ("kl", "listwise"):
        distill = HeadDistillationLoss(form, temperature=0.3, top_k=4)
        assert float(distill(student, student.detach(), labels).detach()) == pytest.approx(0.0, abs=1e-6)
        assert float(distill(student, student.detach().flip(1), labels).detach()) > 1e-3


def test_the_kl_matches_s2sd_on_masked_rows() -> None:
    """S2SD's ``kl_div(log_softmax(A/T), softmax(B/T), 'sum') · T² / B`` with the diagonal left out of every row."""
    embeddings, labels, teachers = _batch(seed=3)
    student, teacher = embeddings @ embeddings.T, teachers[-1][0].detach()
    t, batch = 2.0, len(labels)
    off = ~torch.eye(batch, dtype=torch.bool)
    a, b = student[off].view(batch, batch - 1), teacher[off].view(batch, batch - 1)
    reference = F.kl_div(F.log_softmax(a / t, 1), F.softmax(b / t, 1), reduction="sum") * t**2 / batch
    assert float(HeadDistillationLoss("kl", temperature=t)(student, teacher, labels).detach()) == pytest.approx(
        float(reference.detach()), rel=1e-5
    )


def test_transfer_weight_zero_gives_exactly_todays_objective() -> None:
    embeddings, labels, teachers = _batch()
    similarities = [t[0] for t in teachers]
    today = objective_from_config(tiny_config())
    off = objective_from_config(tiny_config(cia_distill_weight=0.0, cia_distill_form="listwise"))
    on = objective_from_config(tiny_config(cia_distill_weight=5.0, cia_distill_warmup_steps=0))
    assert off.distillation is None
    base = today(embeddings, labels, similarities)
    assert torch.equal(off(embeddings, labels, similarities, step=3).loss, base.loss)
    transferred = on(embeddings, labels, similarities, step=3)
    assert transferred.distill_loss is not None
    assert float(transferred.loss) == pytest.approx(float(base.loss + 5.0 * transferred.distill_loss), rel=1e-6)


def test_warmup_ramps_the_transfer_weight() -> None:
    objective = objective_from_config(tiny_config(cia_distill_weight=10.0, cia_distill_warmup_steps=4))
    assert [objective.distill_scale(s) for s in (0, 2, 4, 9)] == [0.0, 5.0, 10.0, 10.0]


def test_bad_transfer_settings_are_refused_naming_the_flag() -> None:
    with pytest.raises(ValueError, match="cia_distill_form"):
        tiny_config(cia_distill_form="mse").validate()
    with pytest.raises(ValueError, match="cia_distill_level"):
        tiny_config(cia_distill_level=5).validate()


def test_a_detached_head_trains_and_leaves_the_embedder_exactly_as_head_off(shapes, tmp_path) -> None:
    """``cia_detach``: the head's loss trains the head, and the embedder's weights are those of the head-off run."""
    weights, logs = {}, {}
    for name, fields in (("off", {"cia_levels": 0}), ("detached", {"cia_detach": True, "cia_distill_weight": 0.0})):
        out = tmp_path / name
        with one_thread():
            trainer = CrossMetricTrainer(
                tiny_config(dataset=str(shapes), output_dir=str(out), num_epochs=2, export=False, **fields)
            )
            trainer.train()
        weights[name] = load_file(trainer.checkpoints[-1] / "model.safetensors")
        logs[name] = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    embedder = [k for k in weights["off"] if k.startswith("embedder.")]
    assert embedder and all(torch.equal(weights["off"][k], weights["detached"][k]) for k in embedder)
    base = [[r["base_loss"] for r in logs[n] if "loss" in r] for n in ("off", "detached")]
    assert base[0] == base[1]
    level_losses = [r["level_losses"][-1] for r in logs["detached"] if "loss" in r]
    assert level_losses[-1] < level_losses[0]  # the head itself learns
    with safe_open(trainer.checkpoints[-1] / "model.safetensors", "pt") as checkpoint:
        assert any(k.startswith("head.levels.1.") for k in checkpoint.keys())


def test_a_transfer_run_logs_its_term_and_exports_no_head_keys(shapes, tmp_path) -> None:
    config = tiny_config(
        dataset=str(shapes), output_dir=str(tmp_path), num_epochs=1, cia_detach=True, cia_distill_weight=10.0,
        cia_distill_form="listwise", cia_distill_top_k=3, cia_distill_warmup_steps=2,
    )  # fmt: skip
    with one_thread():
        result = CrossMetricTrainer(config).train()
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all("distill_loss" in r for r in log if "loss" in r)
    export = result.export()
    with safe_open(export / "model.safetensors", "pt") as weights:
        assert not [k for k in weights.keys() if k.startswith("head.")]
    card = " ".join((export / "README.md").read_text().split())
    assert "that trained the head alone" in card and "listwise distillation (top 3, temperature 0.1, weight 10" in card


def test_a_run_with_the_head_writes_a_reranker_chosen_on_validation(tmp_path) -> None:
    """RUN/reranker: the selected head as a CrossMetricReranker, alpha and the validation figures in its config."""
    from crossmetric.modeling.reranking_crossmetric import CrossMetricReranker

    shapes = make_shapes_folder(tmp_path / "shapes", num_classes=16, per_class=4)
    config = tiny_config(
        dataset=str(shapes), output_dir=str(tmp_path / "out"), num_epochs=2, cia_detach=True, reranker_top_k=5,
        validation_fraction=0.25, export=False,
    )  # fmt: skip
    with one_thread():
        result = CrossMetricTrainer(config).train()
    assert result.selection_split == "validation" and result.reranker is not None
    reranker = CrossMetricReranker.from_pretrained(result.run_directory / "reranker")
    assert reranker.config.alpha == result.reranker["alpha"]
    assert reranker.config.reranks == result.reranker["reranks"]
    assert set(reranker.config.validation) >= {"recall@1", "rerank/recall@1", "rerank/recall@1_head_only"}
    assert (result.run_directory / "best-head.safetensors").is_file()
    head = load_file(result.run_directory / "best-head.safetensors")
    for key, value in reranker.head.state_dict().items():
        assert torch.equal(value, head[key]), key


def test_a_head_off_run_has_no_reranker(shapes, tmp_path) -> None:
    config = tiny_config(dataset=str(shapes), output_dir=str(tmp_path), num_epochs=1, cia_levels=0, export=False)
    with one_thread():
        result = CrossMetricTrainer(config).train()
    assert result.reranker is None and not (result.run_directory / "reranker").exists()


def test_a_second_stage_trains_the_head_on_the_finished_embedder_which_stays_as_head_off(shapes, tmp_path) -> None:
    """``reranker_stage_steps``: the embedder trains exactly as with the head off; the head trains afterwards."""
    weights = {}
    for name, fields in (("off", {"cia_levels": 0}), ("stage", {"reranker_stage_steps": 5})):
        with one_thread():
            trainer = CrossMetricTrainer(
                tiny_config(dataset=str(shapes), output_dir=str(tmp_path / name), num_epochs=2, export=False, **fields)
            )
            initial_head = None if trainer.model.head is None else trainer.model.head.state_dict()
            initial_head = {k: v.clone() for k, v in (initial_head or {}).items()}
            trainer.train()
        weights[name] = load_file(trainer.checkpoints[-1] / "model.safetensors")
    embedder = [k for k in weights["off"] if k.startswith("embedder.")]
    assert embedder and all(torch.equal(weights["off"][k], weights["stage"][k]) for k in embedder)
    head = trainer.model.head.state_dict()
    assert any(not torch.equal(head[k], initial_head[k]) for k in head)  # trained in the stage, after the loop


def test_a_second_stage_cannot_be_combined_with_a_transfer() -> None:
    with pytest.raises(ValueError, match="reranker_stage_steps"):
        tiny_config(reranker_stage_steps=10, cia_distill_weight=1.0).validate()


def test_the_recipe_gives_the_transfer_to_every_dataset_with_a_detached_head(shapes) -> None:
    """Issue 20's defaults: both recipes teach the embedding from the detached head, unless told otherwise."""
    from crossmetric.training.recipes import TRANSFER_WEIGHT, fit_recipe

    labels = [i // 6 for i in range(48)]
    for fields, expected in (
        ({}, TRANSFER_WEIGHT),
        ({"cia_levels": 0}, 0.0),
        ({"cia_detach": False}, 0.0),
        ({"reranker_stage_steps": 10}, 0.0),
        ({"cia_distill_weight": 3.0}, 3.0),
        ({"dataset": "glyphs"}, TRANSFER_WEIGHT),
        ({"dataset": "glyphs", "cia_levels": 0}, 0.0),
    ):
        config = tiny_config(**{"dataset": str(shapes), **fields})
        fit_recipe(config, labels)
        assert config.cia_distill_weight == expected, fields
        config.validate()
