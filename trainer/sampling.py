"""Which examples each process sees: global batches cut from a seeded per-epoch permutation.

The plan works in global batches, not per-rank shards of the dataset: optimizer step `s` of
epoch `e` always consumes the same `global_batch_size` examples, whatever the number of
processes, and each process takes a contiguous slice of them, cut into micro-batches.
That is what makes 1-process and 2-process runs equal, and lets a resumed run start at
(epoch, step) by arithmetic instead of replaying batches. The trailing examples that do
not fill a global batch are left out of that epoch; the next permutation covers them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from trainer.collators import example_seed


@dataclass(frozen=True)
class BatchPlan:
    """Global-batch arithmetic for one training run on `world_size` processes."""

    num_examples: int
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    rank: int
    seed: int

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches each process runs per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (full global batches only)."""
        return self.num_examples // self.global_batch_size

    def permutation(self, epoch: int) -> list[int]:
        """The example order of one epoch, identical on every rank."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_examples, generator=generator).tolist()

    def micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[list[tuple[int, int]]]:
        """This rank's micro-batches from `start_step` to the end of `epoch`, as
        (epoch, example index) keys: `accumulation_steps` consecutive ones make a step."""
        order = self.permutation(epoch)
        per_rank = self.global_batch_size // self.world_size
        for step in range(start_step, self.steps_per_epoch):
            first = step * self.global_batch_size + self.rank * per_rank
            mine = order[first : first + per_rank]
            for offset in range(0, per_rank, self.micro_batch_size):
                yield [(epoch, index) for index in mine[offset : offset + self.micro_batch_size]]


class KeyedDataset(Dataset):
    """Look examples up by (epoch, index) and attach their masking seed."""

    def __init__(self, examples, run_seed: int) -> None:
        self.examples = examples
        self.run_seed = run_seed

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        return {**self.examples[index], "seed": example_seed(self.run_seed, epoch, index)}


def evaluation_batches(
    num_examples: int, batch_size: int, world_size: int, rank: int
) -> list[tuple[list[int], bool]]:
    """This rank's evaluation batches as (indices, is_real).

    Ranks take interleaved examples, so nothing is counted twice or dropped. Every rank
    runs the same number of forward passes (sharded engines such as ZeRO-3 need every rank
    in each forward): a rank out of examples repeats example 0 with is_real=False, and the
    evaluation loop leaves such batches out of the metrics.
    """
    mine = list(range(rank, num_examples, world_size))
    per_rank = -(-num_examples // world_size)
    count = -(-per_rank // batch_size)
    batches = []
    for b in range(count):
        chunk = mine[b * batch_size : (b + 1) * batch_size]
        batches.append((chunk, True) if chunk else ([0], False))
    return batches
