"""Class weights for imbalanced data (`data.class_weights`): how much a target of each
class counts in the training loss.

The weighted loss is sum_i w[y_i] * CE_i / sum_i w[y_i], the sums running over every
target of the accumulation window on all processes: for one batch exactly what
`F.cross_entropy(logits, labels, weight=w)` gives. The loop therefore counts the target
*weight* before the forward pass where it otherwise counts targets (tasks/losses.py: target_weight).
Evaluation keeps the plain, unweighted loss, so eval losses compare across settings.
"""

from __future__ import annotations

from collections import Counter

import datasets

from trainer.data.encode import IGNORE_INDEX
from trainer.data.read import RowFormat, Split
from trainer.errors import UserError


def label_counts(split: Split, rows: RowFormat) -> Counter[str]:
    """How often each label occurs: per row for classification, per word for NER tags."""
    return Counter(label for row in split.rows for label in rows.labels(row))


def target_counts(encoded: list[datasets.Dataset], label_names: list[str]) -> Counter[str]:
    """How often each label is a training target in encoded data (what the cache holds):
    per row for classification, per word (its first sub-token) for NER, after truncation."""
    counts: Counter[str] = Counter()
    for split in encoded:
        for labels in split["labels"]:
            ids = [labels] if isinstance(labels, int) else labels
            counts.update(label_names[i] for i in ids if i != IGNORE_INDEX)
    return counts


def inverse_frequency(counts: Counter[str], label_names: list[str]) -> list[float]:
    """w_c = n / (C * n_c), sklearn's "balanced" weights.

    Every class then carries the same total weight (n / C), as if the data were balanced,
    and the weights average to 1 over the training targets, so the weighted loss keeps the
    scale of the plain one and the learning rate needs no retuning."""
    total = sum(counts[name] for name in label_names)
    return [total / (len(label_names) * counts[name]) for name in label_names]


def resolve_class_weights(
    setting: str | dict, counts: Counter[str], label_names: list[str] | None
) -> list[float] | None:
    """The weight of each label in id order, or None for the plain loss. A mapping may
    leave labels out (they weigh 1); a key that is not a label of the train data is an
    error naming it."""
    if setting == "none" or label_names is None:
        return None
    if setting == "auto":
        return inverse_frequency(counts, label_names)
    unknown = [label for label in setting if label not in label_names]
    if unknown:
        raise UserError(
            f"data.class_weights: unknown label '{unknown[0]}' "
            f"(labels of data.train: {', '.join(label_names[:20])})"
        )
    return [float(setting.get(name, 1.0)) for name in label_names]
