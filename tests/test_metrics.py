"""trainer.tasks.metrics: count-based metrics equal sklearn/seqeval and add up across processes."""

from __future__ import annotations

import math

import pytest
import torch
from seqeval.metrics import (
    f1_score as seq_f1,
    precision_score as seq_precision,
    recall_score as seq_recall,
)
from seqeval.scheme import IOB2
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from trainer.data.encode import IGNORE_INDEX
from trainer.tasks.metrics import ClassificationMetrics, EntityMetrics, LossMetrics


def alone(tensor: torch.Tensor) -> torch.Tensor:
    """sum_across for a single process."""
    return tensor


def loss_of(logits: torch.Tensor, labels: torch.Tensor):
    flat = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(flat.numel(), -1), flat, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (flat != IGNORE_INDEX).sum()


def fill(metrics, logits, labels):
    metrics.update(logits, labels, *loss_of(logits, labels))
    return metrics


def sum_of_two(first, second):
    """A sum_across for `first` that adds `second`'s matching count tensor, as an all-reduce
    over two processes would. `compute` passes its own count tensors, so the attribute that
    holds the tensor tells which of `second`'s tensors to add."""
    partner = {
        id(value): getattr(second, name)
        for name, value in vars(first).items()
        if isinstance(value, torch.Tensor)
    }
    return lambda mine: mine + partner[id(mine)]


def random_case(num_classes: int, n: int = 301, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=generator)
    labels = torch.randint(num_classes, (n,), generator=generator)
    # Bias the logits towards the truth so the scores are neither 0 nor chance.
    logits[torch.arange(n), labels] += 0.8
    return logits, labels


def test_binary_scores_match_sklearn():
    logits, labels = random_case(2)
    results = fill(ClassificationMetrics(["neg", "pos"]), logits, labels).compute(alone)
    predicted = logits.argmax(-1).numpy()
    truth = labels.numpy()
    assert results["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-9)
    assert results["f1"] == pytest.approx(f1_score(truth, predicted), abs=1e-9)
    assert results["precision"] == pytest.approx(precision_score(truth, predicted), abs=1e-9)
    assert results["recall"] == pytest.approx(recall_score(truth, predicted), abs=1e-9)
    loss, count = loss_of(logits, labels)
    assert results["loss"] == pytest.approx(loss.item() / count.item(), rel=1e-6)
    assert sum(map(sum, results["confusion_matrix"])) == len(labels)


def test_three_classes_use_the_macro_average():
    logits, labels = random_case(3, seed=1)
    results = fill(ClassificationMetrics(["a", "b", "c"]), logits, labels).compute(alone)
    predicted, truth = logits.argmax(-1).numpy(), labels.numpy()
    assert results["accuracy"] == pytest.approx(accuracy_score(truth, predicted), abs=1e-9)
    for name, score in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
        assert results[name] == pytest.approx(score(truth, predicted, average="macro"), abs=1e-9)
    per_class = f1_score(truth, predicted, average=None)
    assert list(results["f1_per_class"].values()) == pytest.approx(list(per_class), abs=1e-9)
    assert results["confusion_matrix"][0][0] == int(((truth == 0) & (predicted == 0)).sum())


def test_class_never_predicted_scores_zero_like_sklearn():
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    logits = torch.nn.functional.one_hot(torch.tensor([0, 1, 1, 1, 1, 0]), 3).float()
    results = fill(ClassificationMetrics(["a", "b", "c"]), logits, labels).compute(alone)
    predicted, truth = logits.argmax(-1).numpy(), labels.numpy()
    expected = f1_score(truth, predicted, average="macro", zero_division=0)
    assert results["f1"] == pytest.approx(expected, abs=1e-9)
    assert results["precision"] == pytest.approx(
        precision_score(truth, predicted, average="macro", zero_division=0), abs=1e-9
    )


@pytest.mark.parametrize("num_classes", [2, 3])
def test_two_halves_sum_to_the_whole(num_classes):
    logits, labels = random_case(num_classes, n=200, seed=2)
    names = [f"c{i}" for i in range(num_classes)]
    whole = fill(ClassificationMetrics(names), logits, labels).compute(alone)
    first = fill(ClassificationMetrics(names), logits[:77], labels[:77])
    second = fill(ClassificationMetrics(names), logits[77:], labels[77:])
    combined = first.compute(sum_of_two(first, second))
    for key in ("accuracy", "f1", "precision", "recall"):
        assert combined[key] == pytest.approx(whole[key], rel=1e-9), key
    assert combined["loss"] == pytest.approx(whole["loss"], rel=1e-6)  # float32 loss sums
    assert combined["confusion_matrix"] == whole["confusion_matrix"]
    assert first.compute(alone)["accuracy"] != pytest.approx(whole["accuracy"], abs=1e-6)


def test_loss_metrics_are_token_weighted():
    metrics = LossMetrics()
    metrics.update(None, None, torch.tensor(10.0), torch.tensor(5))
    metrics.update(None, None, torch.tensor(2.0), torch.tensor(1))
    results = metrics.compute(alone)
    assert results["loss"] == pytest.approx(2.0)  # 12 / 6, not the mean of 2.0 and 2.0
    assert results["perplexity"] == pytest.approx(math.exp(2.0))
    other = LossMetrics()
    other.update(None, None, torch.tensor(9.0), torch.tensor(2))
    assert metrics.compute(sum_of_two(metrics, other))["loss"] == pytest.approx(21.0 / 8)


NER_LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER", "B-ORG", "I-ORG"]
GOLD = [
    ["B-PER", "I-PER", "O", "O", "B-LOC"],
    ["O", "B-ORG", "I-ORG", "I-ORG", "O", "B-PER"],
    ["B-LOC", "O", "B-LOC", "I-LOC"],
    ["O", "O", "O"],
    ["B-ORG", "O", "B-PER", "I-PER", "I-PER"],
]
PREDICTED = [
    ["B-PER", "I-PER", "O", "O", "B-PER"],  # one right, one wrong type
    ["O", "B-ORG", "I-ORG", "O", "O", "B-PER"],  # span cut short, PER right
    ["B-LOC", "O", "I-LOC", "I-LOC"],  # I- without B- is no entity in IOB2
    ["O", "B-PER", "O"],  # spurious entity
    ["B-ORG", "O", "B-PER", "I-PER", "I-PER"],
]


def ner_batch(gold, predicted, pad_to: int = 16):
    """Logits and labels as the model sees them: sub-token and padding positions are -100."""
    ids = {name: i for i, name in enumerate(NER_LABELS)}
    labels = torch.full((len(gold), pad_to), IGNORE_INDEX)
    logits = torch.zeros(len(gold), pad_to, len(NER_LABELS))
    for row, (tags, guesses) in enumerate(zip(gold, predicted, strict=True)):
        positions = [1 + 2 * i for i in range(len(tags))]  # 0: [CLS]; even: sub-tokens
        for position, tag, guess in zip(positions, tags, guesses, strict=True):
            labels[row, position] = ids[tag]
            logits[row, position, ids[guess]] = 5.0
    return logits, labels


def test_entity_scores_match_seqeval_strict():
    logits, labels = ner_batch(GOLD, PREDICTED)
    results = fill(EntityMetrics(NER_LABELS), logits, labels).compute(alone)
    strict = {"mode": "strict", "scheme": IOB2}
    assert results["f1"] == pytest.approx(seq_f1(GOLD, PREDICTED, **strict), abs=1e-9)
    assert results["precision"] == pytest.approx(seq_precision(GOLD, PREDICTED, **strict), abs=1e-9)
    assert results["recall"] == pytest.approx(seq_recall(GOLD, PREDICTED, **strict), abs=1e-9)
    per_type = seq_f1(GOLD, PREDICTED, average=None, **strict)
    assert list(results["f1_per_type"]) == ["LOC", "ORG", "PER"]
    assert list(results["f1_per_type"].values()) == pytest.approx(list(per_type), abs=1e-9)
    tokens = [
        (g, p) for gs, ps in zip(GOLD, PREDICTED, strict=True) for g, p in zip(gs, ps, strict=True)
    ]
    assert results["accuracy"] == pytest.approx(sum(g == p for g, p in tokens) / len(tokens))


def test_entity_halves_sum_to_the_whole():
    logits, labels = ner_batch(GOLD, PREDICTED)
    whole = fill(EntityMetrics(NER_LABELS), logits, labels).compute(alone)
    first = fill(EntityMetrics(NER_LABELS), logits[:2], labels[:2])
    second = fill(EntityMetrics(NER_LABELS), logits[2:], labels[2:])
    combined = first.compute(sum_of_two(first, second))
    for key in ("f1", "precision", "recall", "accuracy"):
        assert combined[key] == pytest.approx(whole[key], rel=1e-9), key
    assert combined["loss"] == pytest.approx(whole["loss"], rel=1e-6)  # float32 loss sums


def test_perfect_entities_score_one():
    logits, labels = ner_batch(GOLD, GOLD)
    results = fill(EntityMetrics(NER_LABELS), logits, labels).compute(alone)
    assert results["f1"] == results["precision"] == results["recall"] == 1.0
