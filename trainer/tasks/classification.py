"""Sequence classification: one label per text (sentiment, topic, intent)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.data.read import LABELLED_TEXT
from trainer.tasks import heads
from trainer.tasks.spec import (
    PredictionHead,
    TaskSpec,
    label_ids,
    padding_collator,
    text_lengths,
    token_loss,
)

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from trainer.config import DataConfig
    from trainer.data.read import Split
    from trainer.tasks.metrics import ClassificationMetrics


def encode(
    split: Split, tokenizer: PreTrainedTokenizerBase, names: list[str] | None, data: DataConfig
) -> datasets.Dataset:
    """Each text truncated to max_length, its label as an id."""
    from trainer.data.encode import encode_classification

    return encode_classification(split, tokenizer, label_ids(names), data.max_length)


def metrics(names: list[str] | None, data: DataConfig) -> ClassificationMetrics:
    """Accuracy, precision, recall and F1 from a confusion matrix."""
    from trainer.tasks.metrics import ClassificationMetrics

    return ClassificationMetrics(names)


CLASSIFICATION = TaskSpec(
    name="classification",
    auto_class="AutoModelForSequenceClassification",
    architectures=("ForSequenceClassification",),
    metrics=("f1", "accuracy", "precision", "recall", "loss"),
    rows=LABELLED_TEXT,
    encode=encode,
    make_collator=padding_collator,
    loss=token_loss,
    make_metrics=metrics,
    lengths=text_lengths,
    prediction=PredictionHead(heads.classify),
    pipeline_tag="text-classification",
    augmentable=True,
    peft_task_type="SEQ_CLS",
    modules_to_save=("classifier", "score"),  # BERT/RoBERTa `classifier`, GPT/Llama `score`
    required_tokens=("pad_token",),
)
