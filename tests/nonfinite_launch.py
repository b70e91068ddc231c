"""`python -m nonfinite_launch train CONFIG [key=value ...]`: `trainer train` with the MLM loss
NaN in the optimizer steps that NAN_STEPS lists ("3" or "2,4"), its gradients finite with
NAN_GRADIENTS=finite. For runs started through `accelerate launch`, in processes of their
own where a test's monkeypatch does not reach; in-process tests patch the registry with
`nan_loss_in` directly."""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys

import trainer.tasks.registry
from trainer.cli import main
from trainer.tasks.registry import TASKS


def nan_loss_in(steps: set[int], accumulation: int = 2, finite_gradients: bool = False) -> dict:
    """The task registry with an MLM loss that is NaN in every micro-batch of the given
    optimizer steps (counted by calls: `accumulation` micro-batches a step). Its gradients
    are NaN too, or with `finite_gradients` the usual ones (as of a loss that overflows
    where no gradient flows): only the loop's own check can then refuse the step."""
    spec = TASKS["mlm"]
    calls = itertools.count()

    def loss(logits, labels, weight=None):
        loss_sum, count = spec.loss(logits, labels, weight)
        if next(calls) // accumulation + 1 not in steps:
            return loss_sum, count
        nan = (loss_sum.detach() if finite_gradients else loss_sum) * float("nan")
        return (loss_sum + nan if finite_gradients else nan), count

    return {**TASKS, "mlm": dataclasses.replace(spec, loss=loss)}


if __name__ == "__main__":
    nan_steps = {int(step) for step in os.environ["NAN_STEPS"].split(",")}
    finite = os.environ.get("NAN_GRADIENTS") == "finite"
    trainer.tasks.registry.TASKS = nan_loss_in(nan_steps, finite_gradients=finite)
    sys.exit(main(sys.argv[1:]))
