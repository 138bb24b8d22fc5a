"""ClassBalancedBatchSampler: P x K batches, determinism, sharding, exact resume, small classes."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from crossmetric import ClassBalancedBatchSampler


def make_labels(sizes: list[int]) -> list[int]:
    return [c for c, size in enumerate(sizes) for _ in range(size)]


LABELS = make_labels([7, 5, 9, 4, 12, 6, 8, 5, 10, 4, 6, 3])  # 79 images, 12 classes, uneven


def test_every_batch_has_p_classes_with_k_images():
    sampler = ClassBalancedBatchSampler(LABELS, batch_size=12, samples_per_class=3, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 79 // 12
    for batch in batches:
        assert len(batch) == 12 and len(set(batch)) == 12  # no image twice in a batch
        counts = Counter(LABELS[i] for i in batch)
        assert len(counts) == 4 and set(counts.values()) == {3}


def test_plugs_into_dataloader():
    dataset = TensorDataset(torch.arange(len(LABELS)), torch.tensor(LABELS))
    sampler = ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2)
    loader = DataLoader(dataset, batch_sampler=sampler)
    batches = list(loader)
    assert len(batches) == len(loader) == len(sampler)
    for indices, labels in batches:
        assert indices.shape == (8,)
        assert sorted(Counter(labels.tolist()).values()) == [2, 2, 2, 2]


def test_an_epoch_covers_equal_classes_without_replacement():
    # 10 classes x 4 images, K=4, P=2: 5 batches per epoch visit each class once -> each image once.
    labels = make_labels([4] * 10)
    sampler = ClassBalancedBatchSampler(labels, batch_size=8, samples_per_class=4, seed=3)
    seen = [i for batch in sampler for i in batch]
    assert sorted(seen) == list(range(40))


def test_deterministic_per_seed_and_epoch_and_different_across_epochs():
    def epoch(seed: int, e: int) -> list[list[int]]:
        sampler = ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2, seed=seed)
        sampler.set_epoch(e)
        return list(sampler)

    assert epoch(0, 0) == epoch(0, 0)
    assert epoch(0, 1) == epoch(0, 1)
    assert epoch(0, 0) != epoch(0, 1)
    assert epoch(0, 0) != epoch(1, 0)


def test_two_ranks_get_different_batches_of_equal_number():
    shards = [
        ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2, num_replicas=2, rank=r, seed=5)
        for r in range(2)
    ]
    single = ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2, seed=5)
    batches = [list(s) for s in shards]
    assert len(shards[0]) == len(shards[1]) == len(batches[0]) == len(batches[1]) == (79 // 8) // 2
    assert {tuple(b) for b in batches[0]}.isdisjoint({tuple(b) for b in batches[1]})
    assert len(single) == 79 // 8  # the whole epoch is split across ranks, not repeated per rank


def test_drop_last_false_rounds_up_per_rank():
    kwargs = dict(batch_size=8, samples_per_class=2, num_replicas=4, num_batches=9)
    assert len(ClassBalancedBatchSampler(LABELS, rank=0, drop_last=True, **kwargs)) == 2
    lengths = {len(list(ClassBalancedBatchSampler(LABELS, rank=r, drop_last=False, **kwargs))) for r in range(4)}
    assert lengths == {3}


def test_resume_mid_epoch_continues_with_the_next_batch():
    reference = ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2, seed=7)
    reference.set_epoch(2)
    full = list(reference)

    first = ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2, seed=7)
    first.set_epoch(2)
    iterator = iter(first)
    done = [next(iterator) for _ in range(3)]
    state = first.state_dict()
    assert state["epoch"] == 2 and state["position"] == 3

    resumed = ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a trainer re-entering its epoch loop must not rewind
    rest = list(resumed)
    assert done + rest == full
    assert list(resumed) == full  # a new iteration starts the epoch afresh
    finished = resumed.state_dict()
    assert finished["position"] == len(full)  # a checkpoint at the end of the epoch ...
    restored = ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2, seed=7)
    restored.load_state_dict(finished)
    assert list(restored) == []  # ... does not replay it
    restored.set_epoch(3)
    assert len(list(restored)) == len(full) and list(restored) != full

    # With workers the loader runs ahead of the loop: the consumed count is what to save.
    assert first.state_dict(consumed=2)["position"] == 2
    assert next(iter(first)) == full[0]  # an abandoned iteration leaves no trace
    with pytest.raises(ValueError, match="seed"):
        ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2, seed=8).load_state_dict(state)


def test_small_classes_replace_vs_drop(caplog):
    labels = make_labels([1, 2, 6, 6, 6, 6])  # class 0 has 1 image, class 1 has 2; K = 3
    with caplog.at_level(logging.WARNING):
        replace = ClassBalancedBatchSampler(labels, batch_size=6, samples_per_class=3, num_batches=20)
    assert "2 of 6 classes have fewer than samples_per_class=3" in caplog.text
    assert replace.small_class_report["count"] == 2 and replace.small_class_report["classes"] == [0, 1]
    batches = list(replace)
    small = [b for b in batches if 0 in [labels[i] for i in b]]
    assert small, "with replacement the 1-image class is still sampled"
    for batch in small:
        assert [i for i in batch if labels[i] == 0] == [0, 0, 0]
    for batch in batches:
        assert sorted(Counter(labels[i] for i in batch).values()) == [3, 3]

    drop = ClassBalancedBatchSampler(labels, batch_size=6, samples_per_class=3, small_classes="drop", num_batches=20)
    assert drop.num_usable_images == 24
    assert all(labels[i] >= 2 for batch in drop for i in batch)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match=r"batch_size=10 is not a multiple of samples_per_class=4"):
        ClassBalancedBatchSampler(LABELS, batch_size=10, samples_per_class=4)
    with pytest.raises(ValueError, match="larger than every class"):
        ClassBalancedBatchSampler(LABELS, batch_size=26, samples_per_class=13, small_classes="drop")
    with pytest.raises(ValueError, match="distinct classes"):
        ClassBalancedBatchSampler(make_labels([4, 4]), batch_size=12, samples_per_class=4)
    with pytest.raises(ValueError, match="rank"):
        ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2, num_replicas=2, rank=2)


def test_accepts_tensor_and_string_labels():
    names = np.array(["cat", "dog", "eel", "fox"])[make_labels([3, 3, 3, 3])]
    batches = list(ClassBalancedBatchSampler(names.tolist(), batch_size=4, samples_per_class=2))
    assert all(len({names[i] for i in b}) == 2 for b in batches)
    tensor = torch.tensor(LABELS)
    assert list(ClassBalancedBatchSampler(tensor, 8, 2)) == list(ClassBalancedBatchSampler(LABELS, 8, 2))


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        sampler = ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2, seed=5)  # rank from dist
        torch.save(
            {"rank": sampler.rank, "replicas": sampler.num_replicas, "batches": list(sampler)},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_rank_and_replicas_default_to_torch_distributed(tmp_path):
    # fork: the children inherit the imported modules (spawn would re-import torch and transformers).
    torch.multiprocessing.start_processes(
        _distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [(r["rank"], r["replicas"]) for r in results] == [(0, 2), (1, 2)]
    explicit = [
        list(ClassBalancedBatchSampler(LABELS, batch_size=8, samples_per_class=2, seed=5, num_replicas=2, rank=r))
        for r in range(2)
    ]
    assert [r["batches"] for r in results] == explicit


def test_datasets_column_is_read_without_running_the_image_transform():
    from datasets import Dataset

    def explode(batch):
        raise AssertionError("the sampler must not decode images to read labels")

    column = Dataset.from_dict({"label": LABELS}).with_transform(explode)["label"]
    assert list(ClassBalancedBatchSampler(column, 8, 2)) == list(ClassBalancedBatchSampler(LABELS, 8, 2))
