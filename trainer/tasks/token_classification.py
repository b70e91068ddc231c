"""Token classification (NER): one tag per word (IO, IOB1, IOB2 or BIOES), scored by entity."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.data.read import TAGGED_WORDS
from trainer.tasks import heads
from trainer.tasks.spec import PredictionHead, TaskSpec, label_ids, padding_collator, token_loss

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from trainer.config import DataConfig
    from trainer.data.read import Split
    from trainer.tasks.metrics import EntityMetrics


def encode(
    split: Split, tokenizer: PreTrainedTokenizerBase, names: list[str] | None, data: DataConfig
) -> datasets.Dataset:
    """The words tokenized, each word's tag on its first sub-token."""
    from trainer.data.encode import encode_token_classification

    return encode_token_classification(split, tokenizer, label_ids(names), data.max_length)


def metrics(names: list[str] | None, data: DataConfig) -> EntityMetrics:
    """Entity-level precision, recall and F1 in the run's tag scheme, token accuracy."""
    from trainer.tasks.metrics import EntityMetrics
    from trainer.tasks.tag_schemes import resolve

    return EntityMetrics(names, resolve(data.tag_scheme, names))


def lengths(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[int]:
    """Tokens per word list, special tokens included."""
    from trainer.data.encode import word_token_counts

    return word_token_counts(tokenizer, [row["tokens"] for row in rows])


TOKEN_CLASSIFICATION = TaskSpec(
    name="token-classification",
    auto_class="AutoModelForTokenClassification",
    architectures=("ForTokenClassification",),
    metrics=("f1", "precision", "recall", "accuracy", "loss"),
    rows=TAGGED_WORDS,
    encode=encode,
    make_collator=padding_collator,
    loss=token_loss,
    make_metrics=metrics,
    lengths=lengths,
    prediction=PredictionHead(heads.tag_entities, word_offsets=True),
    pipeline_tag="token-classification",
    peft_task_type="TOKEN_CLS",
    modules_to_save=("classifier", "score"),
    required_tokens=("pad_token",),
)
