"""The task table: what differs between MLM, CLM, classification and NER.

The training loop never asks which task it runs; it calls the entries of a `TaskSpec`:
how to encode a split, how to batch it, how to compute the loss, which metrics to keep.
A spec may add sequence-level heads trained next to its own loss (BERT pretraining: NSP
next to MLM); each is normalised by its own number of targets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import datasets
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from trainer.config import RunConfig
from trainer.data import collate, encode, sentence_pairs
from trainer.data.encode import IGNORE_INDEX
from trainer.data.read import Split
from trainer.tasks import metrics


def token_loss(
    logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over labelled positions, and how many there were.

    Returning the sum (not the mean) lets the loop divide by the number of targets in the
    whole accumulation window on all processes, so every target weighs the same. With class
    weights (see class_weights.py) each target's loss is multiplied by its class weight and
    the count becomes the sum of those weights."""
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


@dataclass(frozen=True)
class SequenceHead:
    """A sequence-level classification objective trained next to the task's own loss (NSP
    next to MLM). Its loss is a sum with its own target count, so the loop can make it a
    mean over all of its targets, as it does for the task's tokens."""

    name: str  # logged as `<name>_loss`, evaluated as `<name>_loss` and `<name>_accuracy`
    logits_key: str  # where the model output holds its logits
    labels_key: str  # where the batch holds its labels

    def loss(self, output, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy over the batch's sequences, and how many there were."""
        return token_loss(output[self.logits_key], batch[self.labels_key])

    def count(self, batch: dict) -> torch.Tensor:
        """Targets in a batch before the forward pass (for the accumulation-window total)."""
        return (batch[self.labels_key] != IGNORE_INDEX).sum()

    def correct(self, output, batch: dict) -> torch.Tensor:
        """Sequences whose predicted class is the label (for accuracy at evaluation)."""
        return (output[self.logits_key].argmax(-1) == batch[self.labels_key]).sum()


@dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific, as plain functions."""

    encode: Callable[[Split, PreTrainedTokenizerBase, list[str] | None, int], datasets.Dataset]
    make_collator: Callable[[PreTrainedTokenizerBase, RunConfig], Callable]
    loss: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (logits, labels[, weight])
    make_metrics: Callable[[list[str] | None], metrics.LossMetrics]
    has_labels: bool  # label names come from the data (classification, NER)
    shifted_targets: bool = False
    # MLM/CLM: texts to per-document token columns, packed on the fly when streaming
    documents: Callable[[PreTrainedTokenizerBase, list[str]], encode.Columns] | None = None
    logits_key: str = "logits"  # where the model output holds the logits `loss` reads
    extra_heads: tuple[SequenceHead, ...] = ()
    own_loss_name: str = ""  # with extra heads: the name `loss` is logged under (mlm_loss)
    # MLM: the output projection runs on labelled positions only (see forward.py)
    targets_only: bool = False


def _label_ids(names: list[str] | None) -> dict[str, int]:
    return {name: i for i, name in enumerate(names or [])}


TASKS: dict[str, TaskSpec] = {
    "mlm": TaskSpec(
        encode=lambda split, tok, names, length: encode.pack_for_mlm(split, tok, length),
        make_collator=lambda tok, cfg: collate.MaskedLMCollator(
            tok, cfg.mlm, cfg.data.isolate_documents
        ),
        loss=token_loss,
        make_metrics=lambda names: metrics.LossMetrics(),
        has_labels=False,
        documents=encode.mlm_documents,
        targets_only=True,
    ),
    "clm": TaskSpec(
        encode=lambda split, tok, names, length: encode.pack_for_clm(split, tok, length),
        make_collator=lambda tok, cfg: collate.CausalLMCollator(
            tok.eos_token_id if cfg.data.isolate_documents else None
        ),
        loss=next_token_loss,
        make_metrics=lambda names: metrics.LossMetrics(),
        has_labels=False,
        shifted_targets=True,
        documents=encode.clm_documents,
    ),
    "classification": TaskSpec(
        encode=lambda split, tok, names, length: encode.encode_classification(
            split, tok, _label_ids(names), length
        ),
        make_collator=lambda tok, cfg: collate.PaddingCollator(tok.pad_token_id),
        loss=token_loss,
        make_metrics=lambda names: metrics.ClassificationMetrics(names),
        has_labels=True,
    ),
    "token-classification": TaskSpec(
        encode=lambda split, tok, names, length: encode.encode_token_classification(
            split, tok, _label_ids(names), length
        ),
        make_collator=lambda tok, cfg: collate.PaddingCollator(tok.pad_token_id),
        loss=token_loss,
        make_metrics=lambda names: metrics.EntityMetrics(names),
        has_labels=True,
    ),
}

NEXT_SENTENCE_HEAD = SequenceHead("nsp", "seq_relationship_logits", "next_sentence_label")


def pretraining_spec(seed: int) -> TaskSpec:
    """BERT pretraining (mlm.next_sentence): MLM on sentence pairs, masked as MLM blocks are,
    plus next-sentence prediction on pairs drawn with `seed`."""
    return TaskSpec(
        encode=lambda split, tok, names, length: sentence_pairs.encode_sentence_pairs(
            split, tok, length, seed
        ),
        make_collator=lambda tok, cfg: collate.SentencePairCollator(
            collate.MaskedLMCollator(tok, cfg.mlm)
        ),
        loss=token_loss,
        make_metrics=lambda names: metrics.PretrainingMetrics("mlm", [NEXT_SENTENCE_HEAD.name]),
        has_labels=False,
        logits_key="prediction_logits",
        extra_heads=(NEXT_SENTENCE_HEAD,),
        own_loss_name="mlm",
        targets_only=True,
    )


def task_spec(cfg: RunConfig) -> TaskSpec:
    """The spec a run uses: its task's entry, or BERT pretraining with next sentences."""
    return pretraining_spec(cfg.train.seed) if cfg.head == "pretraining" else TASKS[cfg.task]
