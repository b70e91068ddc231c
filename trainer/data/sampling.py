"""Which examples each process sees: global batches cut from a seeded per-epoch order.

The plan works in global batches, not per-rank shards of the dataset: optimizer step `s` of
epoch `e` always consumes the same `global_batch_size` examples, whatever the number of
processes, and each process takes a contiguous slice of them, cut into micro-batches.
That is what makes 1-process and 2-process runs equal, and lets a resumed run start at
(epoch, step) by arithmetic instead of replaying batches. The trailing examples that do
not fill a global batch are left out of that epoch; the next permutation covers them.

The order of an epoch comes from an ordering: a plain seeded permutation, a mixture of
weighted sources, or either of them regrouped by length. All are pure functions of the
seed and the epoch, so they need no state in checkpoints.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from trainer.data.collate import example_seed

# Length grouping sorts windows of this many global batches (more: less padding, less
# randomness in which examples share a batch).
LENGTH_WINDOW_BATCHES = 8


def _permutation(size: int, *seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(hash_seed(*seed))
    return torch.randperm(size, generator=generator).tolist()


def hash_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (run seed, epoch, source, ...)."""
    mixed = 0
    for part in parts:
        mixed = (mixed * 1_000_003 + part) % (2**63 - 1)
    return mixed


@dataclass(frozen=True)
class Shuffled:
    """A fresh seeded permutation of all examples every epoch."""

    size: int
    seed: int

    @property
    def epoch_size(self) -> int:
        """Examples in one epoch."""
        return self.size

    def order(self, epoch: int) -> list[int]:
        """The example order of one epoch, identical on every rank."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.size, generator=generator).tolist()


@dataclass(frozen=True)
class Mixture:
    """Several sources (concatenated in order, `sizes` examples each) drawn by weight.

    An epoch holds as many examples as all sources together, and source s contributes
    round(weight_s x that) of them (largest remainders make the counts add up). Each source
    is read as an endless chain of seeded permutations of itself, continuing from epoch to
    epoch: a small source given a large weight repeats (every example once before any
    twice), a large one given a small weight is covered over several epochs."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    seed: int

    @property
    def epoch_size(self) -> int:
        """Examples in one epoch."""
        return sum(self.sizes)

    def counts(self) -> list[int]:
        """Examples each source gives per epoch."""
        shares = [w / sum(self.weights) * self.epoch_size for w in self.weights]
        counts = [int(share) for share in shares]
        by_remainder = sorted(range(len(shares)), key=lambda s: counts[s] - shares[s])
        for source in by_remainder[: self.epoch_size - sum(counts)]:
            counts[source] += 1
        return counts

    def order(self, epoch: int) -> list[int]:
        """The mixed example order of one epoch, identical on every rank."""
        picks: list[int] = []
        offset = 0
        for source, (size, count) in enumerate(zip(self.sizes, self.counts(), strict=True)):
            for position in range(epoch * count, (epoch + 1) * count):
                rounds, place = divmod(position, size)
                picks.append(offset + self._round(source, rounds)[place])
            offset += size
        return [picks[i] for i in _permutation(len(picks), self.seed, epoch)]

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a few small lists per run
    def _round(self, source: int, rounds: int) -> list[int]:
        return _permutation(self.sizes[source], self.seed, source, rounds)


@dataclass(frozen=True)
class LengthGrouped:
    """Another ordering with each window of `window` examples sorted by length and cut
    into global batches, which are then shuffled: a batch holds texts of similar length
    (little padding) while the batch order stays random. The remainder that does not fill
    a global batch stays last, where the epoch drops it."""

    base: Shuffled | Mixture
    lengths: tuple[int, ...]
    window: int
    batch: int
    seed: int

    @property
    def epoch_size(self) -> int:
        """Examples in one epoch."""
        return self.base.epoch_size

    def order(self, epoch: int) -> list[int]:
        """The base order of one epoch, regrouped by length."""
        order = self.base.order(epoch)
        batches = []
        for start in range(0, len(order), self.window):
            window = sorted(order[start : start + self.window], key=lambda i: -self.lengths[i])
            batches += [window[i : i + self.batch] for i in range(0, len(window), self.batch)]
        rest = batches.pop() if len(batches[-1]) < self.batch else []
        shuffled = [batches[i] for i in _permutation(len(batches), self.seed, epoch, 1)]
        return [index for batch in shuffled for index in batch] + rest


@dataclass(frozen=True)
class BatchPlan:
    """Global-batch arithmetic for one training run on `world_size` processes."""

    ordering: Shuffled | Mixture | LengthGrouped
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    rank: int

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches each process runs per optimizer step."""
        return self.global_batch_size // (self.micro_batch_size * self.world_size)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch (full global batches only)."""
        return self.ordering.epoch_size // self.global_batch_size

    def micro_batches(self, epoch: int, start_step: int = 0) -> Iterator[list[tuple[int, int]]]:
        """This rank's micro-batches from `start_step` to the end of `epoch`, as
        (epoch, example index) keys: `accumulation_steps` consecutive ones make a step."""
        order = self.ordering.order(epoch)
        per_rank = self.global_batch_size // self.world_size
        for step in range(start_step, self.steps_per_epoch):
            first = step * self.global_batch_size + self.rank * per_rank
            mine = order[first : first + per_rank]
            for offset in range(0, per_rank, self.micro_batch_size):
                yield [(epoch, index) for index in mine[offset : offset + self.micro_batch_size]]


@dataclass(frozen=True)
class StreamPlan:
    """The plan of a streamed run: the loop's arithmetic without a known dataset size. The
    whole run counts as one epoch; the stream itself starts new passes as it needs them."""

    accumulation_steps: int
    steps_per_epoch: int


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
