"""The losses: sums over targets with their counts, so the loop can normalise by the number
of targets in the whole accumulation window on all processes (every target weighs the same)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.data.encode import IGNORE_INDEX


def token_loss(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over labelled positions, and how many there were.

    Returning the sum (not the mean) lets the loop divide by the number of targets in the
    whole accumulation window on all processes, so every target weighs the same. With class
    weights (see data/class_weights.py) each target's loss is multiplied by its class weight
    and the count becomes the sum of those weights."""
    flat_labels = labels.reshape(-1)
    loss_sum = F.cross_entropy(
        logits.reshape(flat_labels.numel(), -1).float(),
        flat_labels,
        weight=weight,
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss_sum, target_weight(flat_labels, weight)


def next_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM: position t predicts token t+1. The labels move, not the logits: slicing
    [batch, length, vocab] logits would copy them (250 MB for 16 x 128 x 30k in fp32)."""
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return token_loss(logits, shifted, weight)


def target_weight(labels: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """The number of labelled positions, or with class weights the sum of their weights."""
    labelled = labels != IGNORE_INDEX
    return labelled.sum() if weight is None else weight[labels[labelled]].sum()


def count_targets(
    labels: torch.Tensor, shifted: bool, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Targets (or their class weight) in a batch before the forward pass, for the
    accumulation-window total."""
    return target_weight(labels[:, 1:] if shifted else labels, weight)
