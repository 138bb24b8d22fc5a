"""Model card: rendered from realistic training data, front matter checked locally (no Hub call)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results

from crossmetric import CrossMetricConfig
from crossmetric.model_cards.model_card import (
    CIA_CITATION,
    DEFAULT_TAGS,
    CrossMetricModelCardData,
    backbone_citation,
    eval_results,
    render_model_card,
    write_model_card,
)

SECTIONS = ["## Model details", "## How to use", "### Non-default hyperparameters", "### Training log",
            "## Evaluation", "## Citation"]  # fmt: skip


def realistic_data() -> CrossMetricModelCardData:
    config = CrossMetricConfig(backbone="tf_efficientnet_lite0", embedding_dim=128, cia_levels=2, cia_heads=4)
    data = CrossMetricModelCardData.from_config(
        config,
        model_id="crossmetric-org/cia-effnet-lite0-glyphs",
        base_model="timm/tf_efficientnet_lite0.in1k",
        datasets=["crossmetric/cjk-glyphs"],
        license="apache-2.0",
        tags=["glyphs"],
        hyperparameters={"lr": 3e-4, "cia_loss_weight": 0.5, "sampler": "m_per_class|4"},
    )
    data.add_log(epoch=1, step=50, loss=1.2345, **{"recall@1": 0.4012})
    data.add_log(epoch=2, step=100, loss=0.9876, **{"recall@1": 0.5123})
    data.add_evaluation({"recall@1": 0.5123, "recall@2": 0.6234, "map@r": 0.2101}, "CJK glyphs", dataset_type="glyphs")
    data.add_evaluation({"recall@1": 0.55}, "CJK glyphs", dataset_type="glyphs", split="validation")
    return data


def front_matter(card_text: str) -> str:
    match = re.match(r"^---\n(.*?)\n---\n", card_text, re.S)
    assert match, "card has no YAML front matter"
    return match.group(1)


def test_realistic_card_has_every_section_filled():
    data = realistic_data()
    text = str(render_model_card(data))
    body = text[text.index("\n---\n", 4) :]

    for heading in SECTIONS:
        assert heading in body
    assert "not recorded" not in body and "No training log" not in body and "No evaluation" not in body
    assert "# cia-effnet-lite0-glyphs" in body
    assert "| Backbone | `tf_efficientnet_lite0` (timm) |" in body
    assert "| Embedding size | 128 |" in body
    assert f"| Input size | {data.image_size} × {data.image_size} |" in body  # from the config's timm defaults
    assert "2 level(s)" in body and "4 attention heads" in body and "are **not** in this repository" in body
    assert 'AutoModel.from_pretrained("crossmetric-org/cia-effnet-lite0-glyphs")' in body
    assert 'pipeline("image-feature-extraction", model="crossmetric-org/cia-effnet-lite0-glyphs", pool=True)' in body
    assert 'pipeline("image-retrieval"' in body and "crossmetric search" in body
    # Hyperparameters (sorted, pipes escaped), log rows, one metrics table per split.
    assert "| cia_loss_weight | 0.5000 |" in body and "| sampler | m_per_class\\|4 |" in body
    assert "| epoch | step | loss | recall@1 |" in body and "| 2 | 100 | 0.9876 | 0.5123 |" in body
    assert "### CJK glyphs (test)" in body and "### CJK glyphs (validation)" in body
    assert "| Recall@2 | 0.6234 |" in body and "| MAP@R | 0.2101 |" in body
    assert CIA_CITATION in body and "tan2019efficientnet" in body and "rw2019timm" in body


def test_front_matter_round_trips_through_huggingface_hub(tmp_path: Path):
    data = realistic_data()
    path = write_model_card(data, tmp_path)
    meta = metadata_load(path)

    assert meta["library_name"] == "crossmetric"
    assert meta["pipeline_tag"] == "image-feature-extraction"
    assert meta["tags"] == [*DEFAULT_TAGS, "glyphs"]
    assert meta["base_model"] == "timm/tf_efficientnet_lite0.in1k"
    assert meta["datasets"] == ["crossmetric/cjk-glyphs"] and meta["license"] == "apache-2.0"
    assert "language" not in meta  # None fields are left out

    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "cia-effnet-lite0-glyphs"
    expected = eval_results(data)
    assert len(results) == 4 and results == expected
    assert {r.task_type for r in results} == {"image-retrieval"}
    assert {(r.dataset_name, r.dataset_type, r.dataset_split) for r in results} == {
        ("CJK glyphs", "glyphs", "test"),
        ("CJK glyphs", "glyphs", "validation"),
    }
    assert [(r.metric_type, r.metric_value) for r in results if r.dataset_split == "test"] == [
        ("recall@1", 0.5123),
        ("recall@2", 0.6234),
        ("map@r", 0.2101),
    ]
    assert eval_results_to_model_index(name, results) == meta["model-index"]

    card = ModelCard.load(path)  # parses the front matter into ModelCardData, validating eval results
    assert card.data.library_name == "crossmetric" and card.data.eval_results == expected
    assert card.text.lstrip().startswith("# cia-effnet-lite0-glyphs")


def test_empty_data_says_so_instead_of_rendering_empty_sections():
    text = str(render_model_card(CrossMetricModelCardData()))
    meta = front_matter(text)
    assert "model-index" not in meta and "base_model" not in meta and "library_name: crossmetric" in meta
    assert "All hyperparameters had their default values" in text
    assert "No training log was recorded." in text
    assert "No evaluation results were recorded." in text
    assert "| Backbone | not recorded |" in text
    assert "Whether a cross-image-attention head was used in training was not recorded." in text
    assert not re.search(r"\|[ \t]*\|", text.replace("|:---|:---|", ""))  # no empty table cells
    assert "###  " not in text and "\n\n\n\n" not in text


def test_baseline_without_head_is_described_as_such():
    text = str(render_model_card(CrossMetricModelCardData(backbone="resnet50", cia_levels=0)))
    assert "trained without the cross-image-attention head" in text
    assert "Training-only head" not in text
    assert "he2016deep" in text


@pytest.mark.parametrize(
    ("backbone", "key"),
    [
        ("tf_efficientnet_lite0", "tan2019efficientnet"),
        ("efficientnet_b0.ra_in1k", "tan2019efficientnet"),
        ("resnet50", "he2016deep"),
        ("test_resnet.r160_in1k", "he2016deep"),
        ("vit_base_patch16_224.augreg_in21k", "dosovitskiy2021image"),
        ("test_vit", "dosovitskiy2021image"),
        ("convnext_tiny", None),
        ("mobilevitv2_050", None),
        (None, None),
    ],
)
def test_backbone_citation_by_name(backbone: str | None, key: str | None):
    bib = backbone_citation(backbone)
    assert (bib is None) if key is None else (key in bib)


def test_write_is_atomic_and_replaces_the_old_card(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "README.md").write_text("old card")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_model_card(realistic_data(), tmp_path)
    assert (tmp_path / "README.md").read_text() == "old card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # the temp file was removed

    monkeypatch.undo()
    path = write_model_card(realistic_data(), tmp_path)
    assert path == tmp_path / "README.md" and path.read_text().startswith("---\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    with pytest.raises(NotADirectoryError):
        write_model_card(realistic_data(), tmp_path / "missing")
