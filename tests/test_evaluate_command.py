"""``crossmetric evaluate`` end to end on a real image folder, a real export and a real training checkpoint.

Checks that metrics.json holds exactly the metrics of the model's embeddings, that every picture is a real PNG of a
sensible size, that the retrieval grid's neighbours are the brute-force ones, that the attention maps read the
head's weights on the right token grid, and that user mistakes end with exit code 2, a message and no output.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _training_fixtures import TINY_MODEL, make_shapes_folder, one_thread_fixture, tiny_config
from datasets import ClassLabel, Dataset, DatasetDict, Features
from datasets import Image as ImageFeature
from PIL import Image
from safetensors.torch import load_file, save_file

from crossmetric.cli.main import main
from crossmetric.data.dml_dataset import load_dml_dataset
from crossmetric.evaluation.attention_maps import pair_attention, select_pairs, token_grid, upsample_map
from crossmetric.evaluation.evaluator import embed_split
from crossmetric.evaluation.metrics import query_gallery_metrics, retrieval_metrics
from crossmetric.evaluation.reports import nearest_neighbours, recall_at_k_curve, sample_queries
from crossmetric.inference.loading import load_training_checkpoint, resolve_model
from crossmetric.modeling.configuration_crossmetric import CrossMetricConfig
from crossmetric.modeling.modeling_crossmetric import CrossMetricForMetricLearning, CrossMetricModel
from crossmetric.training.config import TrainingConfig
from crossmetric.training.trainer import CrossMetricTrainer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = TINY_MODEL


_one_thread = pytest.fixture(scope="module", autouse=True, name="_one_thread")(one_thread_fixture)  # tiny models


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """6 classes × 4 images; the sorted split puts classes 3-5 (12 images) in ``test``."""
    return make_shapes_folder(tmp_path_factory.mktemp("data") / "shapes", num_classes=6, per_class=4)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> tuple[Path, Path]:
    """Two exported tiny models with different random weights (model and baseline)."""
    root = tmp_path_factory.mktemp("exports")
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = CrossMetricForMetricLearning(CrossMetricConfig(image_size=32, **TINY))
        paths.append(model.save_embedder(root / f"model{seed}"))
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def run(shapes, tmp_path_factory) -> Path:
    """A real one-epoch training run (64 px: test_resnet's last map is 2×2, the head's stride-16 grid 4×4)."""
    output = tmp_path_factory.mktemp("runs")
    config = tiny_config(
        logging_steps=10, dataset=str(shapes), output_dir=str(output), image_size=64, batch_size=6, num_epochs=1
    )
    CrossMetricTrainer(config).train().export()
    return output / "run"


def _evaluate(*args: str, split_strategy: str = "sorted") -> int:
    return main(["evaluate", "--no-progress", "--split_strategy", split_strategy, *args])


def _check_png(path: Path, min_width: int = 300, min_height: int = 200) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert width >= min_width and height >= min_height, (path, width, height)
    assert pixels.std() > 10, f"{path} looks blank"
    return width, height


def _reference(model_dir: Path, split, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    return embed_split(CrossMetricModel.from_pretrained(model_dir), split, batch_size=batch_size, progress=False)


def test_report_metrics_and_pictures(shapes, exports, run, tmp_path) -> None:
    out = tmp_path / "eval"
    model, baseline = exports
    rc = _evaluate(
        "--model",
        str(model),
        "--dataset",
        str(shapes),
        "--output_dir",
        str(out),
        "--batch_size",
        "5",
        "--baseline_model",
        str(baseline),
        "--checkpoint",
        str(run),
        "--num_queries",
        "4",
        "--top_k",
        "3",
        "--attention_pairs",
        "2",
    )
    assert rc == 0
    test_split = load_dml_dataset(str(shapes), split_strategy="sorted")["test"]
    for name, model_dir in (("metrics.json", model), ("baseline_metrics.json", baseline)):
        written = json.loads((out / name).read_text())
        expected = retrieval_metrics(*_reference(model_dir, test_split, 5), progress=False)
        assert written == pytest.approx(expected, rel=1e-6), name
        assert set(written) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi"}
    report = out / "report"
    pictures = ("recall_at_k.png", "retrieval_grid.png", "attention_maps.png")
    sizes = {name: _check_png(report / name) for name in pictures}
    assert sizes["retrieval_grid.png"][1] > 400  # 4 rows of thumbnails
    text = (report / "report.md").read_text()
    for name in sizes:
        assert f"]({name})" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert f"| recall@1 | {metrics['recall@1']:.4f} |" in text
    curve = json.loads((report / "recall_at_k.json").read_text())
    assert curve["k"] == list(range(1, 9)) and curve["model"][0] == pytest.approx(metrics["recall@1"])
    assert curve["baseline"][7] == pytest.approx(json.loads((out / "baseline_metrics.json").read_text())["recall@8"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging folders left behind"


def test_run_folder_as_model_uses_its_export_and_query_gallery_protocol(shapes, run, tmp_path) -> None:
    """A run folder resolves to its model/ export; a dataset with query/gallery splits is evaluated In-Shop style."""
    assert resolve_model(str(run)) == ("export", run / "model")
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[f"c{i}" for i in range(6)])})

    def split(rows: list[tuple[Path, int]]) -> Dataset:
        return Dataset.from_dict({"image": [str(p) for p, _ in rows], "label": [c for _, c in rows]}, features=features)

    files = {c: sorted((shapes / f"class_{c:02d}").glob("*.png")) for c in range(6)}
    saved = tmp_path / "inshop"
    DatasetDict(
        train=split([(p, c) for c in range(2) for p in files[c]]),
        query=split([(p, c) for c in range(2, 6) for p in files[c][:2]]),
        gallery=split([(p, c) for c in range(2, 6) for p in files[c][2:]]),
    ).save_to_disk(str(saved))
    out = tmp_path / "eval"
    args = (
        "--model",
        str(run),
        "--dataset",
        str(saved),
        "--output_dir",
        str(out),
        "--ks",
        "1",
        "4",
        "--num_queries",
        "2",
        "--top_k",
        "2",
    )
    assert _evaluate(*args, split_strategy="official") == 0
    loaded = load_dml_dataset(str(saved))
    queries = _reference(run / "model", loaded["query"], 256)
    gallery = _reference(run / "model", loaded["gallery"], 256)
    expected = query_gallery_metrics(*queries, *gallery, ks=(1, 4), nmi=True, progress=False)
    assert json.loads((out / "metrics.json").read_text()) == pytest.approx(expected, rel=1e-6)
    _check_png(out / "report" / "retrieval_grid.png")
    assert not (out / "report" / "attention_maps.png").exists()  # only with --checkpoint


def test_nearest_neighbours_equal_brute_force() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x[5] = x[3]  # exact duplicates: ties must go to the lower index
    x[17] = x[3]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = np.array([0, 3, 5, 17, 39])
    indices, scores = nearest_neighbours(x[queries], x, 6, self_ids=queries)
    similarity = x @ x.T
    for row, q in enumerate(queries):
        others = np.array([g for g in range(len(x)) if g != q])
        order = others[np.lexsort((others, -similarity[q, others]))][:6]
        np.testing.assert_array_equal(indices[row], order)
        np.testing.assert_allclose(scores[row], similarity[q, order], rtol=1e-5)
    assert 3 not in indices[1] and 5 in indices[1][:2] and 17 in indices[1][:2]
    gallery_indices, _ = nearest_neighbours(x[:5], x[5:], 3)  # query vs gallery: nothing excluded
    brute = np.argsort(-(x[:5] @ x[5:].T), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(gallery_indices, brute)


def test_recall_curve_passes_through_the_metrics_and_queries_are_seeded() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.repeat(np.arange(10), 3)
    labels[-1] = 99  # one query without a match
    curve = recall_at_k_curve(x, labels, 8)
    metrics = retrieval_metrics(x, labels, ks=(1, 2, 4, 8), nmi=False, progress=False)
    assert [curve[k - 1] for k in (1, 2, 4, 8)] == [metrics[f"recall@{k}"] for k in (1, 2, 4, 8)]
    assert all(a <= b for a, b in zip(curve, curve[1:]))
    chosen = sample_queries(labels, None, 29, seed=3)
    np.testing.assert_array_equal(chosen, sample_queries(labels, None, 29, seed=3))
    assert 29 not in chosen and len(set(chosen)) == 29  # the lone query is drawn last
    assert 29 in sample_queries(labels, None, 30, seed=3)


def test_load_training_checkpoint_is_strict(run, tmp_path) -> None:
    model = load_training_checkpoint(run)  # the run's latest checkpoint
    checkpoint = sorted((run / "checkpoints").glob("checkpoint-*"))[-1]
    weights = load_file(checkpoint / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(weights) and model.head is not None
    assert all(torch.equal(state[k], weights[k]) for k in weights)
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    shutil.copy(run / "training_config.yaml", broken / "training_config.yaml")
    del weights[next(k for k in weights if k.startswith("head."))]
    save_file(weights, broken / "model.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        load_training_checkpoint(broken)


def test_attention_maps_read_the_heads_weights_on_the_token_grid(run) -> None:
    model = load_training_checkpoint(run)
    pixel_values = torch.randn(4, 3, 64, 64)
    pairs = [(0, 1), (2, 3), (3, 0)]
    attention = pair_attention(model, pixel_values, pairs)
    assert attention.maps.shape == (3, 2, 4, 4)  # pairs × levels × the head's grid: test_resnet's stride 16 at 64 px
    with torch.no_grad():
        output = model(pixel_values, output_attentions=True)
    for p, (i, j) in enumerate(pairs):
        for level in range(2):
            expected = output.attentions[level][i, j].mean(dim=0).reshape(4, 4).numpy()
            np.testing.assert_allclose(attention.maps[p, level], expected, rtol=1e-5)
            assert attention.similarities[p, level] == pytest.approx(
                float(output.conditional_similarities[level][i, j]), rel=1e-5
            )
    np.testing.assert_allclose(attention.maps.sum(axis=(2, 3)), 1.0, rtol=1e-5)
    vit = CrossMetricModel(CrossMetricConfig(backbone="test_vit", image_size=64, pooling="cls", embedding_dim=8))
    assert token_grid(vit.eval(), torch.randn(1, 3, 64, 64)) == (4, 4)  # 16 px patches, CLS token left out


def test_upsampled_map_keeps_token_positions() -> None:
    grid = np.zeros((4, 4), np.float32)
    grid[1, 2] = 1.0  # row 1, column 2 (row-major token 6)
    upsampled = upsample_map(grid, 64, 64)
    row, column = np.unravel_index(upsampled.argmax(), upsampled.shape)
    assert 16 <= row < 32 and 32 <= column < 48
    assert upsampled.max() == pytest.approx(1.0) and upsampled.min() == pytest.approx(0.0)
    assert not upsample_map(np.full((2, 2), 0.25), 8, 8).any()  # uniform: no false contrast


def test_pairs_are_seeded_positive_and_negative() -> None:
    labels = np.repeat(np.arange(5), 3)
    pairs = select_pairs(labels, 3, seed=0)
    assert pairs == select_pairs(labels, 3, seed=0)
    assert sum(p for *_, p in pairs) == 3 and len(pairs) == 6
    for i, j, positive in pairs:
        assert i != j and (labels[i] == labels[j]) == positive


def _headless_checkpoint(root: Path) -> Path:
    """A checkpoint folder laid out as the trainer writes it, of a model trained without the head."""
    config = TrainingConfig(pretrained="none", image_size=32, cia_levels=0, **TINY)
    checkpoint = root / "checkpoints" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    save_file(CrossMetricForMetricLearning(config.model_config()).state_dict(), checkpoint / "model.safetensors")
    (checkpoint / "trainer_state.json").write_text("{}")
    (checkpoint / "COMPLETE").write_text("ok\n")
    (root / "training_config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    return checkpoint


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "MISSING"}, "no such folder"),
        ({"--model": "EMPTY"}, "no config.json"),
        ({"--dataset": "no_such_dataset_dir/"}, "no such folder"),
        ({"--split": "validation"}, "not a split"),
        ({"--checkpoint": "HEADLESS"}, "cia_levels=0"),
        ({"--top_k": "0"}, "--top_k must be >= 1"),
    ],
)
def test_user_mistakes_exit_2_with_a_message_and_write_nothing(
    shapes, exports, tmp_path, capsys, change, message
) -> None:
    (tmp_path / "empty").mkdir()
    named = {
        "MISSING": str(tmp_path / "missing" / "model"),
        "EMPTY": str(tmp_path / "empty"),
        "HEADLESS": str(_headless_checkpoint(tmp_path / "headless")) if "HEADLESS" in change.values() else "",
    }
    args = {"--model": str(exports[0]), "--dataset": str(shapes), "--output_dir": str(tmp_path / "out")}
    args.update({k: named.get(v, v) for k, v in change.items()})
    assert _evaluate(*[part for item in args.items() for part in item]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()
