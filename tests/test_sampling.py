"""trainer.data.sampling: global batches are the same examples on any number of processes."""

from __future__ import annotations

import random
from itertools import chain

import pytest

from trainer.data.sampling import (
    BatchPlan,
    KeyedDataset,
    LengthGrouped,
    Mixture,
    Shuffled,
    evaluation_batches,
)


def plan(num_examples=103, global_batch=12, micro=3, world_size=1, rank=0, seed=5) -> BatchPlan:
    return BatchPlan(Shuffled(num_examples, seed), global_batch, micro, world_size, rank)


def steps(batch_plan: BatchPlan, epoch: int, start_step: int = 0) -> list[list[int]]:
    """Example indices per optimizer step for one rank."""
    micro_batches = list(batch_plan.micro_batches(epoch, start_step))
    per_step = batch_plan.accumulation_steps
    grouped = [micro_batches[i : i + per_step] for i in range(0, len(micro_batches), per_step)]
    return [[index for mb in group for _, index in mb] for group in grouped]


def test_steps_per_epoch_counts_full_global_batches_only():
    assert plan(num_examples=103, global_batch=12).steps_per_epoch == 8
    assert plan(num_examples=96, global_batch=12).steps_per_epoch == 8
    assert plan(num_examples=11, global_batch=12).steps_per_epoch == 0


def test_accumulation_steps():
    assert plan(global_batch=12, micro=3, world_size=1).accumulation_steps == 4
    assert plan(global_batch=12, micro=3, world_size=2).accumulation_steps == 2
    assert plan(global_batch=12, micro=6, world_size=2).accumulation_steps == 1


@pytest.mark.parametrize("epoch", [0, 1, 4])
def test_every_example_at_most_once_per_epoch(epoch):
    one = plan()
    micro_batches = list(one.micro_batches(epoch))
    assert len(micro_batches) == one.steps_per_epoch * one.accumulation_steps
    assert all(len(mb) == one.micro_batch_size for mb in micro_batches)
    keys = list(chain.from_iterable(micro_batches))
    assert all(e == epoch for e, _ in keys)
    indices = [index for _, index in keys]
    assert len(indices) == len(set(indices)) == one.steps_per_epoch * one.global_batch_size
    assert set(indices) <= set(range(one.ordering.size))


def test_epochs_use_different_orders_and_cover_the_leftovers():
    one = plan()
    assert one.ordering.order(0) != one.ordering.order(1)
    assert one.ordering.order(0) == plan().ordering.order(0)
    seen = {i for e in range(6) for mb in one.micro_batches(e) for _, i in mb}
    assert seen == set(range(one.ordering.size))


def test_two_ranks_together_take_the_one_process_step():
    single = steps(plan(world_size=1), epoch=2)
    rank0 = steps(plan(world_size=2, rank=0), epoch=2)
    rank1 = steps(plan(world_size=2, rank=1), epoch=2)
    assert len(single) == len(rank0) == len(rank1) == 8
    for whole, first, second in zip(single, rank0, rank1, strict=True):
        assert set(first).isdisjoint(second)
        assert sorted(first + second) == sorted(whole)
        assert first + second == whole  # rank 0 takes the first half, in order


def test_start_step_resumes_where_the_epoch_left_off():
    one = plan()
    assert steps(one, epoch=1, start_step=5) == steps(one, epoch=1)[5:]


def test_keyed_dataset_attaches_epoch_dependent_seed():
    keyed = KeyedDataset([{"input_ids": [1]}, {"input_ids": [2]}], run_seed=3)
    assert keyed[(0, 1)]["input_ids"] == [2]
    assert keyed[(0, 1)]["seed"] == keyed[(0, 1)]["seed"]
    assert keyed[(0, 1)]["seed"] != keyed[(1, 1)]["seed"]
    assert keyed[(0, 0)]["seed"] != keyed[(0, 1)]["seed"]
    assert "seed" not in keyed.examples[0]
    assert len(keyed) == 2


@pytest.mark.parametrize(
    ("num_examples", "batch_size", "world_size"),
    [(10, 3, 1), (10, 3, 2), (7, 2, 2), (1, 4, 2), (9, 4, 3), (16, 4, 4), (5, 8, 2)],
)
def test_evaluation_covers_every_example_once_with_equal_batch_counts(
    num_examples, batch_size, world_size
):
    per_rank = [
        evaluation_batches(num_examples, batch_size, world_size, rank) for rank in range(world_size)
    ]
    assert len({len(batches) for batches in per_rank}) == 1, "ranks must run equal batches"
    real = [i for batches in per_rank for indices, is_real in batches if is_real for i in indices]
    assert sorted(real) == list(range(num_examples))
    for batches in per_rank:
        assert all(0 < len(indices) <= batch_size for indices, _ in batches)
        assert all(all(0 <= i < num_examples for i in indices) for indices, _ in batches)


# --- mixtures of sources -----------------------------------------------------------------


def source_of(index: int, sizes: tuple[int, ...]) -> int:
    for source, size in enumerate(sizes):
        if index < size:
            return source
        index -= size
    raise AssertionError(index)


def test_mixture_gives_each_source_its_weight_of_every_epoch():
    sizes = (300, 1000)  # a small domain corpus weighted up, a large general one down
    mixture = Mixture(sizes, (0.7, 0.3), seed=3)
    assert mixture.counts() == [910, 390]
    for epoch in range(3):
        order = mixture.order(epoch)
        assert len(order) == mixture.epoch_size == 1300
        shares = [sum(source_of(i, sizes) == s for i in order) / len(order) for s in (0, 1)]
        assert shares == pytest.approx([0.7, 0.3], abs=0.001)


def test_mixture_repeats_a_small_source_only_after_using_all_of_it():
    mixture = Mixture((10, 90), (0.5, 0.5), seed=1)
    small = [i for i in mixture.order(0) if i < 10]
    assert len(small) == 50
    assert all(small.count(i) == 5 for i in range(10))  # 5 full rounds, none partial


def test_mixture_covers_a_down_weighted_source_across_epochs_without_repeats():
    mixture = Mixture((10, 90), (0.9, 0.1), seed=1)
    large = [i for epoch in range(9) for i in mixture.order(epoch) if i >= 10]
    assert len(large) == 90 and sorted(large) == list(range(10, 100))


# --- length grouping ---------------------------------------------------------------------


def padded_positions(order: list[int], lengths: list[int], batch: int) -> int:
    batches = [order[i : i + batch] for i in range(0, len(order) // batch * batch, batch)]
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_length_grouping_keeps_every_example_once_and_cuts_padding():
    rng = random.Random(0)
    lengths = [int(rng.lognormvariate(3.5, 0.7)) + 4 for _ in range(1000)]
    base = Shuffled(1000, seed=2)
    grouped = LengthGrouped(base, tuple(lengths), window=8 * 16, batch=16, seed=2)
    for epoch in range(2):
        order = grouped.order(epoch)
        assert sorted(order) == list(range(1000))
        plain = padded_positions(base.order(epoch), lengths, 16)
        assert padded_positions(order, lengths, 16) < 0.75 * plain
    assert grouped.order(0) != grouped.order(1)


def test_length_grouping_batches_cut_from_sorted_windows():
    lengths = list(range(100))
    grouped = LengthGrouped(Shuffled(100, seed=0), tuple(lengths), window=40, batch=8, seed=0)
    order = grouped.order(0)
    assert order[96:] == sorted(order[96:], key=lambda i: -i)  # the remainder stays last
    for start in range(0, 96, 8):
        batch = order[start : start + 8]
        assert batch == sorted(batch, reverse=True)
