"""Scoring a model on a dataset: the same code after training steps and in `trainer evaluate`."""

from __future__ import annotations

import datasets
import torch
from accelerate import Accelerator

from trainer import progress
from trainer.data.sampling import KeyedDataset, evaluation_batches
from trainer.run.forward import forward, to_device
from trainer.tasks.metrics import LossMetrics
from trainer.tasks.spec import Objective, TaskSpec

EVAL_EPOCH = -1  # MLM masks for evaluation come from this fixed "epoch": the same every time


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    examples: datasets.Dataset,
    collator,
    spec: TaskSpec,
    metrics: LossMetrics,
    accelerator: Accelerator,
    batch_size: int,
    seed: int,
    objective: Objective | None = None,
) -> dict:
    """Metrics over all of `examples`, each counted once across all processes. With a
    spec's `objective` (preference pairs), the metrics take what it computes and logs."""
    was_training = model.training
    model.eval()
    keyed = KeyedDataset(examples, seed)
    batches = evaluation_batches(
        len(examples), batch_size, accelerator.num_processes, accelerator.process_index
    )
    # leave=False: after training steps the bar goes, and the training bar below it stays
    for indices, is_real in progress.bar(batches, desc="evaluate", unit="batch", leave=False):
        batch = to_device(collator([keyed[(EVAL_EPOCH, i)] for i in indices]), accelerator.device)
        if objective is not None:
            with accelerator.autocast():
                scored = objective(model, batch)
            if is_real:
                metrics.update_objective(*scored)
            continue
        with accelerator.autocast():
            output, labels = forward(model, batch, spec.targets_only)
        logits = output[spec.logits_key]
        if is_real:
            loss_sum, count = spec.loss(logits, labels)
            metrics.update(logits.float(), labels, loss_sum, count)
            for index, head in enumerate(spec.extra_heads):
                metrics.update_head(index, *head.loss(output, batch), head.correct(output, batch))
    model.train(was_training)
    device = accelerator.device
    return metrics.compute(lambda t: accelerator.reduce(t.to(device), "sum").cpu())
