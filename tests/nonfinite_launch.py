"""`python -m nonfinite_launch train CONFIG [key=value ...]`: `trainer train` with the MLM loss
NaN in the optimizer steps that NAN_STEPS lists ("3" or "2,4"), its gradients finite with
NAN_GRADIENTS=finite, on the process of rank NAN_RANK only when that is set. With
CHECKSUMS=DIR each process appends to DIR/rank<R>.jsonl, after every optimizer step,
whether it was skipped and a SHA-256 of its parameters. For runs started through
`accelerate launch` or torchrun, in processes of their own where a test's monkeypatch does
not reach; in-process tests patch the registry with `nan_loss_in` directly."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
from pathlib import Path

import trainer.run.train
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


def checksummed(optimizer_step, path: Path):
    """`optimizer_step` that then appends {"skipped", "sha256" of the parameters} to `path`."""

    def step(model, *args, **kwargs):
        result = optimizer_step(model, *args, **kwargs)
        digest = hashlib.sha256()
        for name, param in model.named_parameters():
            digest.update(name.encode() + param.detach().cpu().numpy().tobytes())
        with path.open("a") as handle:
            record = {"skipped": bool(result.skipped), "sha256": digest.hexdigest()}
            handle.write(json.dumps(record) + "\n")
        return result

    return step


if __name__ == "__main__":
    nan_steps = {int(step) for step in os.environ["NAN_STEPS"].split(",")}
    finite = os.environ.get("NAN_GRADIENTS") == "finite"
    rank = os.environ.get("RANK", "0")
    if os.environ.get("NAN_RANK", rank) == rank:
        trainer.tasks.registry.TASKS = nan_loss_in(nan_steps, finite_gradients=finite)
    if "CHECKSUMS" in os.environ:
        path = Path(os.environ["CHECKSUMS"]) / f"rank{rank}.jsonl"
        trainer.run.train.optimizer_step = checksummed(trainer.run.train.optimizer_step, path)
    sys.exit(main(sys.argv[1:]))
