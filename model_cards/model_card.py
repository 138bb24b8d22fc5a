"""Model cards for crossmetric models, filled during training and rendered from a Jinja template.

As in sentence-transformers: a dataclass (:class:`CrossMetricModelCardData`) collects what the card
needs while a model is trained and evaluated (backbone, head settings, non-default hyperparameters,
training log rows, evaluation metrics); :func:`render_model_card` turns it into a
``huggingface_hub.ModelCard`` from ``model_cards/template.md``, with the Hub metadata (library, task,
tags, base model, datasets, license, and the metrics as ``model-index`` entries) in the YAML front
matter; :func:`write_model_card` saves it as ``README.md`` next to the exported weights.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..utils.atomic_files import write_atomic

TEMPLATE_PATH = Path(__file__).resolve().parent.parent / "model_cards" / "template.md"

LIBRARY_NAME = "crossmetric"
PIPELINE_TAG = "image-feature-extraction"
DEFAULT_TAGS = (
    "crossmetric",
    "image-feature-extraction",
    "deep-metric-learning",
    "image-retrieval",
    "timm",
    "cross-image-attention",
)
TASK_TYPE = "image-retrieval"
TASK_NAME = "Image Retrieval"

CIA_CITATION = r"""@inproceedings{kotovenko2023cross,
  title     = {Cross-Image-Attention for Conditional Embeddings in Deep Metric Learning},
  author    = {Kotovenko, Dmytro and Ma, Pingchuan and Milbich, Timo and Ommer, Bj{\"o}rn},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2023}
}"""

TIMM_CITATION = r"""@misc{rw2019timm,
  author       = {Ross Wightman},
  title        = {PyTorch Image Models},
  year         = {2019},
  publisher    = {GitHub},
  journal      = {GitHub repository},
  doi          = {10.5281/zenodo.4414861},
  howpublished = {\url{https://github.com/rwightman/pytorch-image-models}}
}"""

# Backbone family (matched on the timm model name) -> the paper that introduced it.
BACKBONE_CITATIONS: tuple[tuple[str, str], ...] = (
    (
        r"efficientnet",
        r"""@inproceedings{tan2019efficientnet,
  title     = {{EfficientNet}: Rethinking Model Scaling for Convolutional Neural Networks},
  author    = {Tan, Mingxing and Le, Quoc V.},
  booktitle = {Proceedings of the 36th International Conference on Machine Learning (ICML)},
  year      = {2019}
}""",
    ),
    (
        r"(^|_)resnet",
        r"""@inproceedings{he2016deep,
  title     = {Deep Residual Learning for Image Recognition},
  author    = {He, Kaiming and Zhang, Xiangyu and Ren, Shaoqing and Sun, Jian},
  booktitle = {Proceedings of the IEEE Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2016}
}""",
    ),
    (
        r"(^|_)vit(_|$)",
        r"""@inproceedings{dosovitskiy2021image,
  title     = {An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale},
  author    = {Dosovitskiy, Alexey and Beyer, Lucas and Kolesnikov, Alexander and Weissenborn, Dirk and
               Zhai, Xiaohua and Unterthiner, Thomas and Dehghani, Mostafa and Minderer, Matthias and
               Heigold, Georg and Gelly, Sylvain and Uszkoreit, Jakob and Houlsby, Neil},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2021}
}""",
    ),
)


def backbone_citation(backbone: str | None) -> str | None:
    """BibTeX of the paper behind a timm backbone name (EfficientNet, ResNet, ViT), or None if unknown."""
    name = (backbone or "").lower().split(".")[0]
    return next((bib for pattern, bib in BACKBONE_CITATIONS if re.search(pattern, name)), None)


@dataclass
class EvalReport:
    """Metrics (name -> value, e.g. ``{"recall@1": 0.71}``) measured on one dataset split."""

    dataset_name: str  # human-readable, e.g. "CUB-200-2011"
    metrics: dict[str, float]
    dataset_type: str | None = None  # Hub dataset id or short id, e.g. "cub200"; defaults to the name
    split: str = "test"


@dataclass
class CrossMetricModelCardData:
    """Everything a crossmetric model card shows; fill it while training, render it at export."""

    model_id: str | None = None  # Hub repo id "namespace/name", used in the usage examples
    model_name: str | None = None  # title of the card; defaults to the repo name or the backbone
    backbone: str | None = None  # timm model name, e.g. "tf_efficientnet_lite0"
    base_model: str | None = None  # Hub id of the initial weights, e.g. "timm/tf_efficientnet_lite0.in1k"
    embedding_dim: int | None = None
    image_size: int | None = None
    pooling: str | None = None
    cia_levels: int | None = None  # 0 or None: trained without the cross-image-attention head
    cia_heads: int | None = None
    cia_dim: int | None = None
    cia_query: str | None = None
    cia_detach: bool | None = None  # the head trained on detached features: its loss never reached the embedder
    transfer: str | None = None  # how the head's similarities taught the embedding, e.g. "listwise (top 16, T 0.1)"
    transfer_stopped: str | None = None  # where the transfer's stop rule fired and why (training/transfer_gate.py)
    datasets: list[str] = field(default_factory=list)  # training datasets (Hub ids or names)
    license: str | None = None
    language: list[str] | None = None
    tags: list[str] = field(default_factory=list)  # added to DEFAULT_TAGS
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # only the non-default ones
    training_logs: list[dict[str, Any]] = field(default_factory=list)  # rows: epoch, step, loss, recall@1...
    eval_reports: list[EvalReport] = field(default_factory=list)
    citations: list[str] = field(default_factory=list)  # extra BibTeX entries (e.g. of the loss)
    onnx: dict[str, Any] | None = None  # the ONNX export's check (training/onnx_export.py), when onnx/ was written
    model_selection: str | None = None  # how the exported model was chosen (validation split, best-on-test, last)
    reranker: dict[str, Any] | None = None  # the head shipped in reranker/ (training/reranker_export.py), when it is

    @classmethod
    def from_config(cls, config: Any, **fields: Any) -> CrossMetricModelCardData:
        """Take the architecture fields from a ``CrossMetricConfig`` (any object with those attributes)."""
        names = ("backbone", "embedding_dim", "image_size", "pooling", "cia_levels", "cia_heads", "cia_dim")
        values = {name: getattr(config, name, None) for name in (*names, "cia_query", "cia_detach")}
        return cls(**{**values, **fields})

    def add_evaluation(
        self, metrics: dict[str, float], dataset_name: str, *, dataset_type: str | None = None, split: str = "test"
    ) -> None:
        """Record metrics measured on ``dataset_name``/``split`` (a later call for the same split replaces it)."""
        self.eval_reports = [r for r in self.eval_reports if (r.dataset_name, r.split) != (dataset_name, split)]
        self.eval_reports.append(EvalReport(dataset_name, dict(metrics), dataset_type, split))

    def add_log(self, **row: Any) -> None:
        """Append one training log row, e.g. ``add_log(epoch=1, step=120, loss=0.42, **{"recall@1": 0.6})``."""
        self.training_logs.append(row)

    @property
    def display_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model_id:
            return self.model_id.split("/")[-1]
        return f"crossmetric-{self.backbone}" if self.backbone else "crossmetric model"

    @property
    def uses_cia(self) -> bool:
        return bool(self.cia_levels)


def metric_display_name(name: str) -> str:
    """Readable metric name: ``recall@1`` -> ``Recall@1``, ``map@r`` -> ``MAP@R``, ``nmi`` -> ``NMI``."""
    known = {"map@r": "MAP@R", "r_precision": "R-Precision", "r-precision": "R-Precision", "nmi": "NMI"}
    if name.lower() in known:
        return known[name.lower()]
    match = re.fullmatch(r"recall@(\d+)", name, re.I)
    return f"Recall@{match.group(1)}" if match else name


def _format_value(value: Any) -> str:
    """A table cell: floats with 4 decimals, other values as text, Markdown pipes escaped."""
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.4f}"
    elif value is None:
        text = "—"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(_format_value(h) for h in header) + " |", "|" + "|".join(":---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_format_value(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _log_table(rows: list[dict[str, Any]]) -> str | None:
    if not rows:
        return None
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    return markdown_table(columns, [[row.get(c) for c in columns] for row in rows])


def _eval_tables(reports: list[EvalReport]) -> list[dict[str, str]]:
    return [
        {
            "title": f"{report.dataset_name} ({report.split})",
            "table": markdown_table(
                ["Metric", "Value"], [[metric_display_name(k), v] for k, v in report.metrics.items()]
            ),
        }
        for report in reports
        if report.metrics
    ]


def eval_results(data: CrossMetricModelCardData) -> list[EvalResult]:
    """The evaluation metrics as ``huggingface_hub.EvalResult`` entries (the card's ``model-index``)."""
    return [
        EvalResult(
            task_type=TASK_TYPE,
            task_name=TASK_NAME,
            dataset_type=report.dataset_type or report.dataset_name,
            dataset_name=report.dataset_name,
            dataset_split=report.split,
            metric_type=name,
            metric_name=metric_display_name(name),
            metric_value=float(value),
        )
        for report in data.eval_reports
        for name, value in report.metrics.items()
    ]


def card_metadata(data: CrossMetricModelCardData) -> ModelCardData:
    """The YAML front matter of the card as ``huggingface_hub.ModelCardData``."""
    results = eval_results(data)
    return ModelCardData(
        library_name=LIBRARY_NAME,
        pipeline_tag=PIPELINE_TAG,
        tags=[*DEFAULT_TAGS, *data.tags],
        base_model=data.base_model,
        datasets=list(data.datasets) or None,
        license=data.license,
        language=data.language,
        model_name=data.display_name if results else None,
        eval_results=results or None,
    )


def citations(data: CrossMetricModelCardData) -> list[str]:
    """BibTeX entries to show: the CIA paper, the backbone's paper, timm, and any extra ones."""
    entries = [CIA_CITATION]
    backbone = backbone_citation(data.backbone)
    if backbone is not None:
        entries.append(backbone)
    entries.append(TIMM_CITATION)
    return entries + [c for c in data.citations if c not in entries]


def render_model_card(data: CrossMetricModelCardData, template_path: str | os.PathLike[str] | None = None) -> ModelCard:
    """Render ``data`` with the Jinja template (``model_cards/template.md`` by default)."""
    template_path = Path(template_path or TEMPLATE_PATH)
    if not template_path.is_file():
        raise FileNotFoundError(f"model card template {str(template_path)!r} not found: reinstall crossmetric.")
    hyperparameters = sorted(data.hyperparameters.items())
    return ModelCard.from_template(
        card_data=card_metadata(data),
        template_path=str(template_path),
        data=data,
        display_name=data.display_name,
        repo=data.model_id or "path/to/exported-model",
        hyperparameter_table=markdown_table(["Hyperparameter", "Value"], [list(kv) for kv in hyperparameters])
        if hyperparameters
        else None,
        log_table=_log_table(data.training_logs),
        eval_tables=_eval_tables(data.eval_reports),
        citation_list=citations(data),
    )


def write_model_card(data: CrossMetricModelCardData, directory: str | os.PathLike[str]) -> Path:
    """Write the rendered card to ``directory/README.md`` atomically (``utils.atomic_files``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise NotADirectoryError(f"{str(directory)!r} is not a directory: export the model there first.")
    write_atomic(directory / "README.md", str(render_model_card(data)))
    return directory / "README.md"
