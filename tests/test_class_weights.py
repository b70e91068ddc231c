"""`data.class_weights`: the weights, their checks, and a loss that is exactly
F.cross_entropy(weight=w) over the whole accumulation window."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import datasets
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import NEGATIVE, NEUTRAL, POSITIVE, read_metrics, reset_accelerate, write_csv

from trainer.cli import main
from trainer.config import build_config
from trainer.data.class_weights import (
    inverse_frequency,
    label_counts,
    resolve_class_weights,
    target_counts,
)
from trainer.data.encode import IGNORE_INDEX
from trainer.data.read import LABELLED_TEXT, TAGGED_WORDS, Split
from trainer.errors import UserError
from trainer.run.step import optimizer_step
from trainer.tasks.losses import count_targets, token_loss
from trainer.tasks.registry import TASKS


def split_of(labels: list[str]) -> Split:
    return Split("data.train", [{"text": "x", "label": label} for label in labels], [])


# --- the weights ---------------------------------------------------------------------------


def test_auto_is_inverse_frequency():
    train = split_of(["a"] * 6 + ["b"] * 3 + ["c"])
    weights = resolve_class_weights("auto", label_counts(train, LABELLED_TEXT), ["a", "b", "c"])
    # n / (C * n_c) with n = 10, C = 3
    assert weights == pytest.approx([10 / 18, 10 / 9, 10 / 3])
    # each class carries the same total weight, and the mean weight per target is 1
    counts = label_counts(train, LABELLED_TEXT)
    assert [w * counts[c] for w, c in zip(weights, "abc", strict=True)] == pytest.approx(
        [10 / 3] * 3
    )
    assert sum(w * counts[c] for w, c in zip(weights, "abc", strict=True)) / 10 == pytest.approx(1)


def test_auto_for_ner_counts_words():
    train = Split("data.train", [{"tokens": ["x"] * 4, "tags": ["O", "O", "O", "B-PER"]}], [])
    assert label_counts(train, TAGGED_WORDS) == {"O": 3, "B-PER": 1}
    assert inverse_frequency(label_counts(train, TAGGED_WORDS), ["O", "B-PER"]) == [
        pytest.approx(4 / 6),
        2.0,
    ]


def test_target_counts_of_encoded_data_skip_ignored_positions():
    encoded = [
        datasets.Dataset.from_dict({"labels": [[-100, 0, 1, -100, 0]]}),
        datasets.Dataset.from_dict({"labels": [[0, -100]]}),
    ]
    assert target_counts(encoded, ["O", "B-PER"]) == {"O": 3, "B-PER": 1}
    rows = datasets.Dataset.from_dict({"labels": [1, 1, 0]})
    assert target_counts([rows], ["neg", "pos"]) == {"pos": 2, "neg": 1}


def test_mapping_leaves_unlisted_labels_at_one_and_rejects_unknown_ones():
    counts = label_counts(split_of(["neg", "pos"]), LABELLED_TEXT)
    assert resolve_class_weights({"pos": 4}, counts, ["neg", "pos"]) == [1, 4]
    assert resolve_class_weights("none", counts, ["neg", "pos"]) is None
    with pytest.raises(UserError, match=r"^data\.class_weights: unknown label 'neutral'"):
        resolve_class_weights({"neutral": 2.0}, counts, ["neg", "pos"])


def config_errors(**data) -> str:
    raw = {"task": "classification", "model": {"name_or_path": "m"}, "data": {"train": "t.csv"}}
    raw["data"] |= data
    with pytest.raises(UserError) as caught:
        build_config(raw, world_size=1)
    return str(caught.value)


def test_bad_settings_are_config_errors():
    assert "data.class_weights: 'balanced' is not one of none, auto" in config_errors(
        class_weights="balanced"
    )
    message = config_errors(class_weights={"pos": -1, "neg": "x"})
    assert "data.class_weights.pos: must be a number > 0, got -1" in message
    assert "data.class_weights.neg: must be a number > 0, got 'x'" in message
    raw = {"task": "mlm", "model": {"name_or_path": "m"}}
    raw["data"] = {"train": "t.txt", "class_weights": "auto"}
    with pytest.raises(UserError, match=r"data\.class_weights: only for task classification"):
        build_config(raw, world_size=1)


def test_integer_label_keys_become_strings():
    raw = {"task": "classification", "model": {"name_or_path": "m"}}
    raw["data"] = {"train": "t.csv", "class_weights": {0: 1.0, 1: 3.0}}
    assert build_config(raw, world_size=1).data.class_weights == {"0": 1.0, "1": 3.0}


# --- the loss ------------------------------------------------------------------------------


def test_token_loss_with_weights_is_weighted_cross_entropy():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, generator=generator)
    labels = torch.tensor([[0, 1, IGNORE_INDEX, 2, 0], [IGNORE_INDEX, 1, 1, 0, 0]])
    weight = torch.tensor([0.5, 2.0, 3.0])
    loss_sum, weight_sum = token_loss(logits, labels, weight)
    expected = F.cross_entropy(logits.reshape(10, 3), labels.reshape(-1), weight=weight)
    assert (loss_sum / weight_sum).item() == pytest.approx(expected.item(), rel=1e-6)
    assert weight_sum.item() == pytest.approx(0.5 * 4 + 2.0 * 3 + 3.0)
    assert count_targets(labels, shifted=False, weight=weight) == weight_sum


@pytest.fixture(scope="module")
def classifier_batch(tiny_bert):
    """Eight texts, three classes, collated; the halves hold unequal class weight sums."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["good film", "bad food", "good room", "a mild pain", "bad film", "good", "bad", "a"]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([0, 0, 0, 0, 0, 1, 1, 2])
    return batch


def load_classifier(model_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # the new classification head
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=3).eval()


def test_step_loss_equals_cross_entropy_with_weights(tiny_bert, classifier_batch):
    weight = torch.tensor([0.4, 2.5, 6.0])
    with torch.no_grad():
        logits = load_classifier(tiny_bert)(
            **{k: v for k, v in classifier_batch.items() if k != "labels"}
        ).logits
    expected = F.cross_entropy(logits, classifier_batch["labels"], weight=weight)
    plain = F.cross_entropy(logits, classifier_batch["labels"])
    assert abs(expected.item() - plain.item()) > 1e-3, "the weights should matter here"

    reset_accelerate()
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = load_classifier(tiny_bert)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    halves = [{k: v[s : s + 4] for k, v in classifier_batch.items()} for s in (0, 4)]
    spec = TASKS["classification"]
    sums = optimizer_step(
        model, halves, spec, accelerator, optimizer, scheduler, 0.0, class_weights=weight
    ).sums
    assert (sums.loss / sums.targets).item() == pytest.approx(expected.item(), rel=1e-5)

    # and the update is the gradient of that loss: plain SGD with lr 1 by hand
    reference = load_classifier(tiny_bert)
    inputs = {k: v for k, v in classifier_batch.items() if k != "labels"}
    F.cross_entropy(
        reference(**inputs).logits, classifier_batch["labels"], weight=weight
    ).backward()
    trained = accelerator.unwrap_model(model).state_dict()
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.grad is not None:
                assert torch.allclose(trained[name], param - param.grad, atol=1e-6), name


# --- an imbalanced run ---------------------------------------------------------------------


def imbalanced_rows(count: int, positive_share: float, seed: int) -> list[dict]:
    """Like conftest.sentiment_rows, but with `positive_share` of the rows positive."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label = "positive" if rng.random() < positive_share else "negative"
        words = rng.choices(NEUTRAL, k=rng.randint(3, 10))
        words.insert(
            rng.randint(0, len(words)), rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        )
        rows.append({"text": " ".join(words) + " .", "label": label})
    return rows


def train_with(run_config, tmp_path, class_weights, **train) -> Path:
    config = run_config(
        "classification",
        output_dir=str(tmp_path / json.dumps(class_weights)),
        data={
            "train": str(tmp_path / "train.csv"),
            "validation": str(tmp_path / "validation.csv"),
            "class_weights": class_weights,
        },
        train=train,
    )
    reset_accelerate()
    assert main(["train", str(config)]) == 0
    return tmp_path / json.dumps(class_weights)


def test_imbalanced_run_records_its_auto_weights(run_config, tmp_path):
    train_rows = imbalanced_rows(160, 0.1, seed=11)
    write_csv(tmp_path / "train.csv", train_rows)
    write_csv(tmp_path / "validation.csv", imbalanced_rows(80, 0.5, seed=12))
    run_dir = train_with(run_config, tmp_path, "auto", epochs=1)
    positives = sum(row["label"] == "positive" for row in train_rows)
    expected = {"negative": 160 / (2 * (160 - positives)), "positive": 160 / (2 * positives)}
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["class_weights"] == pytest.approx(expected)
    assert summary["class_weights"]["positive"] > 3  # about 10% positive
    assert all(math.isfinite(r["loss"]) for r in read_metrics(run_dir) if "loss" in r)
    assert json.loads((run_dir / "eval_results.json").read_text())["steps"] == 20


def test_weights_of_one_train_exactly_as_no_weights(run_config, tmp_path):
    """The weighted path divides by the sum of the weights: with all weights 1 that is the
    target count, so the logged losses and gradient norms are those of the plain loss."""
    write_csv(tmp_path / "train.csv", imbalanced_rows(64, 0.1, seed=11))
    write_csv(tmp_path / "validation.csv", imbalanced_rows(16, 0.5, seed=12))
    logs = []
    for setting in ("none", {"negative": 1, "positive": 1}):
        run_dir = train_with(run_config, tmp_path, setting, max_steps=4)
        logs.append([(r["loss"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r])
    assert len(logs[0]) == 4
    assert [v for pair in logs[1] for v in pair] == pytest.approx(
        [v for pair in logs[0] for v in pair], rel=1e-6
    )
