"""How the global batch splits over processes and micro-batches.

The global batch is the unit of the run: the same examples per optimizer step, the same
learning-rate schedule and the same loss on one CPU or on sixteen GPUs. The micro batch is
only how many of them one process takes per forward pass, a matter of memory and speed:
the loss is normalised over the targets of the whole step on every process
(trainer/run/step.py), so splitting a step into more, smaller micro-batches changes neither
its examples nor its loss (only the random draws of dropout and masking fall differently).
`train.micro_batch_size` is therefore the most a process takes: where it does not divide a
process's share, the largest value below it that does is used, and the same recipe runs on
1, 2, 8 or 16 processes. Only a global batch that the
processes cannot share evenly is an error.
"""

from __future__ import annotations


def fit_micro_batch(total: int, most: int, world_size: int, errors: list[str]) -> int:
    """The micro batch to use: the largest value up to `most` (train.micro_batch_size)
    that divides the share of the global batch `total` of each of `world_size` processes;
    an error line when no share is even."""
    if total <= 0 or most <= 0 or world_size <= 0:
        return most  # reported by the range checks
    if total % world_size:
        errors.append(
            f"train.global_batch_size: {total} is not divisible by the {world_size} "
            f"processes; use a multiple of {world_size}"
        )
        return most
    share = total // world_size
    return max(m for m in range(1, min(most, share) + 1) if share % m == 0)
