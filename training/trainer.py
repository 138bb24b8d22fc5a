"""The Accelerate training loop: P×K batches, the cross-image-attention objective, evaluation, exact resume.

Under ``accelerate launch`` with several processes the base loss sees the embeddings of all processes (all-gather
with gradients) while the head's pairs stay within each process's batch (docs/design.md §1).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..data.dml_dataset import label_array, load_dml_dataset
from ..data.sampler import ClassBalancedBatchSampler
from ..data.transforms import attach_transform, build_transform, collate_fn
from ..evaluation.evaluator import DivergedModelError, Evaluator
from ..inference.run_folder import LOG_FILE, TRAINING_CONFIG_FILE, checkpoint_root, complete_checkpoints, read_state
from ..modeling.configuration_crossmetric import HEAD_FIELDS
from ..modeling.modeling_crossmetric import CrossMetricForMetricLearning
from ..utils.atomic_files import check_writable
from ..utils.atomic_files import write_atomic as write_text_atomic
from ..utils.fault_points import fault_point
from .checkpointing import load_checkpoint, resolve_checkpoint, write_checkpoint
from .config import TrainingConfig
from .distributed import all_gather_labels, all_gather_with_gradient
from .embedding_init import initialize_embedding_from_features
from .model_selection import ModelSelection, add_validation_split
from .optimization import batchnorm_layers, build_optimizer, clip_groups, freeze_batchnorm_parameters
from .optimization import freeze_unreached_head_parameters as freeze_unreached_head
from .recipes import fit_recipe
from .reranker_fit import fit_run_reranker
from .reranker_stage import freeze_head_for_stage
from .result import TrainingResult
from .token_grid import head_token_note
from .transfer_gate import TransferGate

logger = logging.getLogger(__name__)


class CrossMetricTrainer:
    """Train a :class:`CrossMetricForMetricLearning` on a class-disjoint DML dataset with Accelerate.

    Args:
        config: the run's :class:`TrainingConfig` (validated here, before any work).
        dataset: an already loaded ``DatasetDict`` (train + eval split); by default ``config.dataset`` is loaded.
        model: a model to train instead of one built from ``config``.
    """

    def __init__(self, config: TrainingConfig, dataset: Any = None, model: CrossMetricForMetricLearning | None = None):
        config.validate()
        self.config = config
        self.run_directory = config.run_directory
        check_writable(self.run_directory, flag="--output_dir")
        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, project_dir=str(self.run_directory),
                                       gradient_accumulation_steps=config.gradient_accumulation_steps,
                                       log_with=None if config.report_to == "none" else config.report_to)  # fmt: skip
        set_seed(config.seed)
        self.dataset = dataset if dataset is not None else self._load_dataset()
        if "train" not in self.dataset:
            raise ValueError(f"The dataset has no 'train' split (it has {list(self.dataset)}).")
        self.dataset, self.selection_split, selection_note = add_validation_split(self.dataset, config)
        self.recipe = [*fit_recipe(config, label_array(self.dataset["train"]), self.accelerator.num_processes)]
        self.recipe.append(selection_note)
        config.validate()  # again, with the values the recipe chose
        evaluation = {"max_images": config.max_eval_images, "batch_size": config.eval_batch_size, "seed": config.seed}
        self.test_evaluator = Evaluator.from_dataset(self.dataset, "test", **evaluation)
        self.selection_evaluator = None
        if self.selection_split is not None:
            self.selection_evaluator = Evaluator.from_dataset(self.dataset, self.selection_split, **evaluation)
        self.selection = ModelSelection(self.run_directory, config.selection_metric)
        self.model = model if model is not None else self._build_model()
        self.recipe += filter(None, [head_token_note(self.model)])  # how many tokens the head attends over
        for line in self.recipe:
            logger.info(line)
        if config.embedding_init == "pca" and model is None and not config.resume_from_checkpoint:
            initialize_embedding_from_features(
                self.model.embedder,
                self.dataset["train"],
                seed=config.seed,
                device=self.accelerator.device,
                batch_size=config.eval_batch_size,
                progress=config.progress and self.accelerator.is_local_main_process,
            )
        # channels-last is 1.4-1.6x faster for CPU convolutions (measured on tf_efficientnet_lite0 at 64 px)
        self.model = self.model.to(memory_format=torch.channels_last)
        if config.compile_head and self.model.head is not None:  # in place: the state_dict keys do not change
            self.model.head.compile()  # CPU, 4x4 tokens: 0.79x the head's time, after a ~35 s compile
        num_classes = self.dataset["train"].features["label"].num_classes
        from .losses.registry import objective_from_config

        self.objective = objective_from_config(config, num_classes=num_classes)
        sampler_arguments = dict(
            labels=self.dataset["train"]["label"], batch_size=config.batch_size, seed=config.seed,
            samples_per_class=config.samples_per_class, num_replicas=self.accelerator.num_processes,
            rank=self.accelerator.process_index, small_classes=config.small_classes,
        )  # fmt: skip
        self.sampler = ClassBalancedBatchSampler(**sampler_arguments)
        if config.steps_per_epoch and config.steps_per_epoch < len(self.sampler):  # a cap, not a floor
            self.sampler = ClassBalancedBatchSampler(
                **sampler_arguments, num_batches=config.steps_per_epoch * self.accelerator.num_processes
            )
        train_transform = build_transform(
            self.model.config.preprocessing, train=True, hflip=config.hflip, scale=(config.scale_min, 1.0)
        )
        self.train_loader = DataLoader(
            attach_transform(self.dataset["train"], train_transform),
            batch_sampler=self.sampler,
            collate_fn=collate_fn,
            num_workers=config.num_workers,
            generator=torch.Generator().manual_seed(config.seed),  # iterator creation must not draw global RNG
        )
        batches_per_epoch = len(self.sampler) // config.gradient_accumulation_steps
        self.total_steps = config.max_steps if config.max_steps > 0 else batches_per_epoch * config.num_epochs
        if config.freeze_batchnorm:
            freeze_batchnorm_parameters(self.model)
        freeze_unreached_head(self.model, self.objective.loss_weight, self.objective.level_weights)  # before DDP
        if config.reranker_stage_steps:  # the head trains after the embedder (training/reranker_stage.py)
            freeze_head_for_stage(self.model)
        self.optimizer = build_optimizer(self.model, self.objective, config)
        self.scheduler = get_scheduler(
            config.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=min(config.warmup_steps, self.total_steps),
            num_training_steps=self.total_steps,
        )
        if any(p.requires_grad for p in self.objective.parameters()):  # proxies: trained and checkpointed
            self.model, self.objective, self.optimizer, self.scheduler = self.accelerator.prepare(
                self.model, self.objective, self.optimizer, self.scheduler
            )
        else:  # parameter-free losses need no wrapping (DDP refuses modules without parameters)
            self.model, self.optimizer, self.scheduler = self.accelerator.prepare(
                self.model, self.optimizer, self.scheduler
            )
            self.objective = self.objective.to(self.accelerator.device)
        self.global_step = self.epoch = self.batches_done_in_epoch = 0
        self.zero_shot: dict[str, float] | None = None
        self.history: list[dict[str, Any]] = []
        self.step_seconds: list[float] = []  # compute time of each batch (forward, loss, backward, step), no data
        self.clip_groups = clip_groups(self.model, self.accelerator.unwrap_model(self.model), config.cia_detach)
        unwrap = self.accelerator.unwrap_model  # the transfer's stop rule (transfer_gate.py):
        self.transfer_gate = TransferGate(config, unwrap(self.objective), unwrap(self.model), self.selection_split)

    # ----------------------------------------------------------------------------------------------- building
    def _load_dataset(self) -> Any:
        c = self.config
        columns = {"image_column": c.image_column, "label_column": c.label_column}
        return load_dml_dataset(c.dataset, data_dir=c.data_dir, split_strategy=c.split_strategy, seed=c.seed, **columns)

    def _build_model(self) -> CrossMetricForMetricLearning:
        c = self.config
        if c.model_name_or_path:  # its architecture, with this run's head fields
            head = {name: getattr(c.model_config(), name) for name in HEAD_FIELDS}
            return CrossMetricForMetricLearning.from_pretrained(c.model_name_or_path, **head)
        model = CrossMetricForMetricLearning(c.model_config())
        if c.pretrained != "none":
            from ..inference.pretrained import load_pretrained_backbone

            load_pretrained_backbone(model, c.pretrained)
        return model

    # ----------------------------------------------------------------------------------------------- training
    def train(self) -> TrainingResult:
        c, accelerator = self.config, self.accelerator
        if c.resume_from_checkpoint:
            self._resume(resolve_checkpoint(self.run_directory, c.resume_from_checkpoint))
        if accelerator.is_main_process:
            c.save_yaml(self.run_directory / TRAINING_CONFIG_FILE)
        if c.report_to != "none":
            accelerator.init_trackers("crossmetric", config=c.flat_values())
        if self.global_step == 0 and self.batches_done_in_epoch == 0 and not self.validation_curve:
            if c.zero_shot_eval:  # a report, never a candidate: the test split does not select anything
                self.zero_shot = self._evaluate(self.test_evaluator, record="zero_shot")
            self._select()  # the starting model is a candidate: the export is never worse on validation
        started = time.perf_counter()
        num_epochs = c.num_epochs if c.max_steps <= 0 else math.ceil(self.total_steps / max(1, len(self.sampler)))
        while self.epoch < num_epochs and self.global_step < self.total_steps:
            self._train_epoch()
            if self.batches_done_in_epoch >= len(self.sampler):  # a whole epoch, not a max_steps stop
                self.epoch += 1
                self.batches_done_in_epoch = 0
            if self.global_step >= self.total_steps or self.epoch >= num_epochs:
                break
            if c.eval_every_epochs and self.epoch % c.eval_every_epochs == 0:
                self._select()
            self._save_checkpoint()
        train_seconds = time.perf_counter() - started
        if not self.validation_curve or self.validation_curve[-1]["step"] != self.global_step:
            self._select()
        self._save_checkpoint()
        accelerator.wait_for_everyone()
        if self.selection_evaluator is not None:  # every process continues with the selected weights (from disk:
            self.selection.restore(accelerator.unwrap_model(self.model))  # only the main process knows which)
        model = accelerator.unwrap_model(self.model)  # its selected head, fused on validation (RUN/reranker): main only
        self.reranker = fit_run_reranker(model, self.dataset, self.selection_split, c, accelerator, self.train_loader,
                                         self.objective)  # fmt: skip
        metrics = self._evaluate(self.test_evaluator, record="final")
        for tracker in accelerator.trackers:  # not end_training(): the caller may still need the process group
            tracker.finish()
        median_step = statistics.median(self.step_seconds) if self.step_seconds else None
        return TrainingResult(
            self.run_directory, self.global_step, metrics, self.selection.best, self.history, train_seconds, None,
            median_step, self.zero_shot, self.selection_split, self.validation_curve, self.recipe,
            accelerator.unwrap_model(self.model), c, self.reranker,
        )  # fmt: skip

    def _train_epoch(self) -> None:
        c, accelerator = self.config, self.accelerator
        self.sampler.set_epoch(self.epoch)
        self.sampler.load_state_dict({**self.sampler.state_dict(), "position": self.batches_done_in_epoch})
        self._set_train_mode()
        bar = tqdm(
            total=len(self.sampler),
            initial=self.batches_done_in_epoch,
            desc=f"epoch {self.epoch + 1}",
            disable=not (c.progress and accelerator.is_local_main_process),
            dynamic_ncols=True,
        )
        for batch in self.train_loader:
            step_started = time.perf_counter()
            with accelerator.accumulate(self.model):
                output = self._loss(batch)
                accelerator.backward(output.loss)
                if accelerator.sync_gradients and c.max_grad_norm:
                    for parameters in self.clip_groups:  # the head's norm apart from the embedder's when detached
                        accelerator.clip_grad_norm_(parameters, c.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()
            self.step_seconds.append(time.perf_counter() - step_started)
            self.batches_done_in_epoch += 1
            bar.update(1)
            if accelerator.sync_gradients:
                self.global_step += 1
                if self.global_step % c.logging_steps == 0 or self.global_step == 1:
                    self._log_step(output)
                    bar.set_postfix(loss=f"{output.loss.item():.4f}")
                if c.save_steps and self.global_step % c.save_steps == 0:
                    self._save_checkpoint()
                fault_point("train_step")  # test hook (tests/test_faults.py): a no-op unless CROSSMETRIC_TEST_PAUSE
                if self.global_step >= self.total_steps:
                    break
        bar.close()

    def _loss(self, batch: dict[str, torch.Tensor]) -> Any:
        device = self.accelerator.device
        pixel_values = batch["pixel_values"].to(device).contiguous(memory_format=torch.channels_last)
        labels = batch["labels"].to(device)
        output = self.model(pixel_values, skip_head=bool(self.config.reranker_stage_steps))
        embeddings = output.embeddings.float()
        gathered = all_gather_with_gradient(embeddings)
        gathered_labels = all_gather_labels(labels)
        query_index = None
        if gathered.shape[0] != embeddings.shape[0]:
            offset = self.accelerator.process_index * embeddings.shape[0]
            query_index = torch.arange(offset, offset + embeddings.shape[0], device=device)
        similarities = tuple(s.float() for s in (output.conditional_similarities or ()))
        return self.objective(
            embeddings,
            labels,
            similarities,
            gathered_embeddings=gathered if query_index is not None else None,
            gathered_labels=gathered_labels if query_index is not None else None,
            query_index=query_index,
            step=self.global_step,
        )

    def _set_train_mode(self) -> None:
        self.model.train()
        self.objective.train()
        if self.config.freeze_batchnorm:  # the standard R50 recipe: BatchNorm statistics stay fixed
            for module in batchnorm_layers(self.accelerator.unwrap_model(self.model)):
                module.eval()

    def _log_step(self, output: Any) -> None:
        record = {
            "step": self.global_step,
            "epoch": round(self.epoch + self.batches_done_in_epoch / max(1, len(self.sampler)), 4),
            "loss": float(output.loss.item()),
            "base_loss": float(output.base_loss.item()),
            "level_losses": [float(v.item()) for v in output.level_losses],
            **({} if output.distill_loss is None else {"distill_loss": float(output.distill_loss.item())}),
            "learning_rates": [group["lr"] for group in self.optimizer.param_groups],
        }
        self._append_log(record)
        every = max(1, self.total_steps // 10 // self.config.logging_steps) * self.config.logging_steps
        if not self.config.progress and self.global_step % every == 0:  # progress in a log file, about 10 lines
            logger.info("step %d/%d, epoch %.2f, loss %.4f", self.global_step, self.total_steps, record["epoch"],
                        record["loss"])  # fmt: skip
        if self.config.report_to != "none":
            self.accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=self.global_step)

    def _append_log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.accelerator.is_main_process:
            with open(self.run_directory / LOG_FILE, "a") as stream:
                stream.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Retrieval metrics of the current embedder on unseen classes: ``"test"`` or the selection split."""
        evaluator = self.test_evaluator if split == "test" else self.selection_evaluator
        if evaluator is None:
            raise ValueError(f"this run has no {split!r} evaluation (selection split: {self.selection_split}).")
        return self._evaluate(evaluator)

    def _evaluate(self, evaluator: Evaluator, record: str | None = None) -> dict[str, float]:
        """Metrics on the main process (the others wait); ``record`` names them in the log."""
        metrics: dict[str, float] = {}
        if self.accelerator.is_main_process:
            embedder = self.accelerator.unwrap_model(self.model).embedder
            progress = self.config.progress and self.accelerator.is_local_main_process
            try:
                metrics = evaluator(embedder, device=self.accelerator.device, progress=progress)
            except DivergedModelError as error:
                if record != "eval":
                    raise
                logger.warning("step %d: %s It stays a candidate that retrieves nothing.", self.global_step, error)
                metrics = evaluator.worst_metrics()
            if record is not None:
                self._append_log({"step": self.global_step, "epoch": self.epoch, record: metrics})
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            logger.info("step %d, %s: %s", self.global_step, evaluator.name, shown)
        self.accelerator.wait_for_everyone()
        self._set_train_mode()
        return metrics

    @property
    def validation_curve(self) -> list[dict[str, Any]]:
        return [{"step": r["step"], **r["eval"]} for r in self.history if "eval" in r]

    def _select(self) -> None:
        """Evaluate the current model on the selection split as a candidate for export."""
        if self.selection_evaluator is None:
            return
        metrics = self._evaluate(self.selection_evaluator, record="eval")
        if self.accelerator.is_main_process:
            if self.config.report_to != "none":
                self.accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=self.global_step)
            self.selection.consider(self.global_step, metrics, self.accelerator.unwrap_model(self.model))
        self.accelerator.wait_for_everyone()
        self.transfer_gate.at_evaluation(self.accelerator, self.model, self.dataset.get("validation"), self.global_step,
                                         self.total_steps, self._append_log, self._set_train_mode)  # fmt: skip

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self) -> None:
        state = {
            "global_step": self.global_step,
            "epoch": self.epoch,
            "batches_done_in_epoch": self.batches_done_in_epoch,
            "best_metrics": self.selection.best,
            "zero_shot": self.zero_shot,
            "history_length": len(self.history),
            "num_processes": self.accelerator.num_processes,
        }
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            write_checkpoint(
                self.run_directory, self.global_step, self.accelerator.save_state, state, self.config.save_total_limit
            )
            self.config.save_yaml(checkpoint_root(self.run_directory) / TRAINING_CONFIG_FILE)
        self.accelerator.wait_for_everyone()

    def _resume(self, checkpoint: Path) -> None:
        state = read_state(checkpoint)
        if state["num_processes"] != self.accelerator.num_processes:
            raise ValueError(
                f"{checkpoint} was written by {state['num_processes']} processes; resume it with the same number "
                f"(now {self.accelerator.num_processes}) so that the batch order continues exactly."
            )
        load_checkpoint(self.accelerator, checkpoint)
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.batches_done_in_epoch = state["batches_done_in_epoch"]
        self.selection.best = state["best_metrics"]
        self.zero_shot = state.get("zero_shot")
        log = self.run_directory / LOG_FILE
        if log.exists():  # drop log lines written after the checkpoint, by the run that was interrupted
            lines = log.read_text().splitlines()[: state["history_length"]]
            self.history = [json.loads(line) for line in lines]
            self.transfer_gate.restore(self.history)
            if self.accelerator.is_main_process:
                write_text_atomic(log, "".join(line + "\n" for line in lines))
        logger.info("Resumed from %s at step %d", checkpoint, self.global_step)

    @property
    def checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.run_directory)
