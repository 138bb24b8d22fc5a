"""Class-balanced (P classes x K images) batch sampler for deep metric learning.

Pair and triplet losses need positives inside every batch: a random batch of 64 images from 100
classes rarely holds two images of one class. So each batch here holds ``P = batch_size / K``
distinct classes with exactly ``K`` images each (the "PK" sampling of Hermans et al. 2017, as
pytorch-metric-learning's ``MPerClassSampler``). We write it by hand because the library versions
are neither resumable mid-epoch nor shard-aware; this one is:

- deterministic given ``(seed, epoch)``: every process builds the same global list of batches and
  takes every ``num_replicas``-th one from ``rank`` on, so processes get different batches and
  exactly the same number of them (DDP would hang otherwise);
- resumable: ``state_dict()`` holds the epoch and the number of batches already yielded, and a
  sampler that loads it continues with the very next batch.

Within an epoch, each class's images are drawn without replacement (a shuffled queue per class,
reshuffled when used up) and classes are visited in shuffled rounds, so an epoch covers the data
about evenly.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

SmallClassPolicy = Literal["replace", "drop"]


def _default_replicas() -> tuple[int, int]:
    """``(num_replicas, rank)`` from torch.distributed when it is initialised, else ``(1, 0)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _as_array(labels: Any) -> np.ndarray:
    """Labels as a numpy array; a ``datasets`` column is read through Arrow, not row by row."""
    if isinstance(labels, torch.Tensor):
        return labels.cpu().numpy()
    if isinstance(labels, np.ndarray):
        return labels
    source, column = getattr(labels, "source", None), getattr(labels, "column_name", None)
    if column is not None and hasattr(source, "with_format"):  # datasets.Column: skip any image transform
        return np.asarray(source.with_format("arrow")[column].to_pylist())
    if hasattr(labels, "to_pylist"):  # pyarrow arrays
        return np.asarray(labels.to_pylist())
    return np.asarray(list(labels))


class ClassBalancedBatchSampler(Sampler[list[int]]):
    """Yield batches of ``P = batch_size // samples_per_class`` classes x ``K = samples_per_class`` images.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``; call ``set_epoch(epoch)`` before each
    epoch so that epochs differ.

    Args:
        labels: class label of every dataset index (ints, strings, a tensor or a datasets column).
        batch_size: images per batch on one process; must be a multiple of ``samples_per_class``.
        samples_per_class: K, images of each class in a batch (>= 2 gives positives).
        seed: base seed; batches are a function of ``(seed, epoch)`` only.
        num_replicas: number of processes sharing the epoch (default: torch.distributed world size,
            else 1).
        rank: this process's index in ``[0, num_replicas)`` (default: torch.distributed rank, else 0).
        small_classes: what to do with classes that have fewer than K images: ``"replace"`` samples
            them with replacement (every image at least once, then random repeats), ``"drop"``
            never samples them. Either way they are listed in ``small_class_report`` and a warning
            gives their count.
        num_batches: batches per epoch summed over all processes (default: usable images //
            batch_size, at least one per process).
        drop_last: when the batches do not split evenly over the processes, ``True`` gives each
            process ``num_batches // num_replicas`` batches, ``False`` rounds up (a few extra batches
            are drawn so that every process still gets the same number).
    """

    def __init__(
        self,
        labels: Sequence[Any] | np.ndarray | torch.Tensor,
        batch_size: int,
        samples_per_class: int,
        seed: int = 0,
        *,
        num_replicas: int | None = None,
        rank: int | None = None,
        small_classes: SmallClassPolicy = "replace",
        num_batches: int | None = None,
        drop_last: bool = True,
    ) -> None:
        labels = _as_array(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"labels must be a non-empty 1-D sequence of class labels, got shape {labels.shape}.")
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}.")
        if batch_size < 1 or batch_size % samples_per_class != 0:
            suggestion = max(1, batch_size // samples_per_class) * samples_per_class
            raise ValueError(
                f"batch_size={batch_size} is not a multiple of samples_per_class={samples_per_class}: each batch "
                f"holds P classes x K images. Choose e.g. batch_size={suggestion}."
            )
        if small_classes not in ("replace", "drop"):
            raise ValueError(f"small_classes must be 'replace' or 'drop', got {small_classes!r}.")
        if num_replicas is None or rank is None:
            default_replicas, default_rank = _default_replicas()
            num_replicas = default_replicas if num_replicas is None else num_replicas
            rank = default_rank if rank is None else rank
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank} must lie in [0, num_replicas={num_replicas}).")

        self.batch_size = batch_size
        self.samples_per_class = samples_per_class
        self.classes_per_batch = batch_size // samples_per_class
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.small_classes = small_classes
        self.drop_last = drop_last

        classes, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
        per_class = np.split(order, bounds)
        small = [c for c, idx in zip(classes.tolist(), per_class) if len(idx) < samples_per_class]
        self.small_class_report: dict[str, Any] = {
            "samples_per_class": samples_per_class,
            "policy": small_classes,
            "count": len(small),
            "classes": small,
        }
        if small_classes == "drop":
            kept = [idx for idx in per_class if len(idx) >= samples_per_class]
        else:
            kept = list(per_class)
        if small:
            action = "sampled with replacement" if small_classes == "replace" else "dropped"
            logger.warning(
                "%d of %d classes have fewer than samples_per_class=%d images; they are %s.",
                len(small),
                len(classes),
                samples_per_class,
                action,
            )
        if not kept:
            raise ValueError(
                f"samples_per_class={samples_per_class} is larger than every class (largest: "
                f"{max(len(i) for i in per_class)} images) and small_classes='drop' drops them all. "
                "Lower samples_per_class or use small_classes='replace'."
            )
        if len(kept) < self.classes_per_batch:
            raise ValueError(
                f"A batch needs {self.classes_per_batch} distinct classes (batch_size={batch_size} / "
                f"samples_per_class={samples_per_class}) but only {len(kept)} classes can be sampled. "
                "Lower batch_size or samples_per_class."
            )
        self._class_indices: list[np.ndarray] = kept
        self.num_usable_images = int(sum(len(i) for i in kept))

        if num_batches is None:
            num_batches = self.num_usable_images // batch_size
        elif num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}.")
        per_process = num_batches // num_replicas if drop_last else math.ceil(num_batches / num_replicas)
        self.batches_per_process = max(1, per_process)

        self.epoch = 0
        self._position = 0  # batches of this epoch yielded so far
        self._resume_from = 0  # where the next iteration starts (set by load_state_dict)

    def __len__(self) -> int:
        """Batches this process yields per epoch (the same on every process)."""
        return self.batches_per_process

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's batches; a new epoch starts at its first batch.

        Setting the epoch that is already current keeps the position, so that a trainer which calls
        ``set_epoch`` at the top of its loop after ``load_state_dict`` still resumes mid-epoch.
        """
        if epoch != self.epoch:
            self.epoch = epoch
            self._position = self._resume_from = 0

    def state_dict(self, consumed: int | None = None) -> dict[str, int]:
        """Epoch and position (batches of this epoch already yielded) for an exact resume.

        A DataLoader with ``num_workers > 0`` draws batches from the sampler ahead of the training
        loop, so pass ``consumed`` (the batches the loop actually used this epoch) in that case.
        """
        position = self._position if consumed is None else consumed
        if not 0 <= position <= len(self):
            raise ValueError(f"consumed={consumed} must lie in [0, {len(self)}].")
        return {"epoch": self.epoch, "position": position, "seed": self.seed, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore ``state_dict()``; the next iteration continues with the very next batch."""
        saved = (state.get("seed", self.seed), state.get("num_replicas", self.num_replicas))
        if saved != (self.seed, self.num_replicas):
            raise ValueError(
                f"Sampler state was saved with seed={saved[0]}, num_replicas={saved[1]} but this sampler has "
                f"seed={self.seed}, num_replicas={self.num_replicas}; the batch order would differ."
            )
        self.epoch = int(state["epoch"])
        self._position = self._resume_from = int(state["position"])

    def _global_batches(self) -> list[list[int]]:
        """All processes' batches of the current epoch, in order (identical on every process)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        k, p = self.samples_per_class, self.classes_per_batch
        queues: list[deque[int]] = [deque() for _ in self._class_indices]
        class_round: deque[int] = deque()
        batches: list[list[int]] = []
        for _ in range(self.batches_per_process * self.num_replicas):
            chosen: list[int] = []
            deferred: list[int] = []
            while len(chosen) < p:
                if not class_round:
                    class_round.extend(rng.permutation(len(self._class_indices)).tolist())
                c = class_round.popleft()
                (deferred if c in chosen else chosen).append(c)
            class_round.extendleft(reversed(deferred))  # a class seen twice waits for the next batch
            batch: list[int] = []
            for c in chosen:
                members = self._class_indices[c]
                if len(members) < k:  # small class under "replace": all images once, then random repeats
                    extra = rng.choice(members, size=k - len(members), replace=True)
                    batch.extend(rng.permutation(members).tolist() + extra.tolist())
                    continue
                queue = queues[c]
                if len(queue) < k:  # without replacement until the class is used up
                    leftover = set(queue)  # kept out of the refill so that no image appears twice in a batch
                    queue.extend(i for i in rng.permutation(members).tolist() if i not in leftover)
                batch.extend(queue.popleft() for _ in range(k))
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        """This process's batches of the epoch, from the restored position (else the first batch).

        Each new iteration starts afresh (an abandoned one leaves no trace) unless ``load_state_dict``
        came in between. After a full pass ``state_dict()`` says the epoch is complete, so resuming
        from it yields nothing until ``set_epoch`` moves on.
        """
        mine = self._global_batches()[self.rank :: self.num_replicas]
        self._position, self._resume_from = self._resume_from, 0
        while self._position < len(mine):
            batch = mine[self._position]
            self._position += 1
            yield batch
