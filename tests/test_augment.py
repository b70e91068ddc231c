"""EDA augmentation: each operation does what it says, variants are a pure function of
(seed, epoch, row, copy), and only the classification train split grows."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from conftest import reset_accelerate

from trainer.cli import main
from trainer.config import AugmentConfig, build_config
from trainer.data.augment import (
    AugmentedDataset,
    augment_text,
    random_deletion,
    random_insertion,
    random_swap,
    read_synonyms,
    synonym_replacement,
)
from trainer.data.encode import encode_classification
from trainer.data.read import LABELLED_TEXT, read_split
from trainer.errors import UserError

TABLE = "# test table\ngood\tgreat,fine\nbad\tawful\nfilm\tmovie,picture\n\nfood\tthe meal\n"
SYNONYMS = {
    "good": ["great", "fine"],
    "bad": ["awful"],
    "film": ["movie", "picture"],
    "food": ["the meal"],
}
TEXT = "A good film with bad food and a very long queue at the door ."


def rng(seed: int = 0) -> random.Random:
    return random.Random(seed)


# --- the synonym table ---------------------------------------------------------------------


def test_table_is_read_with_comments_and_phrases(tmp_path):
    (tmp_path / "syn.tsv").write_text(TABLE)
    assert read_synonyms(str(tmp_path / "syn.tsv")) == SYNONYMS


def test_bad_table_line_names_key_file_and_line(tmp_path):
    (tmp_path / "syn.tsv").write_text("good\tgreat\nbad awful\n")
    with pytest.raises(UserError) as caught:
        read_synonyms(str(tmp_path / "syn.tsv"))
    assert str(caught.value) == (
        "data.augment.synonyms: syn.tsv line 2: expected 'word<TAB>synonym,synonym'"
    )


def test_shipped_table_reads():
    from conftest import REPO

    table = read_synonyms(str(REPO / "data/sentiment/synonyms.tsv"))
    assert len(table) > 100 and "great" in table["excellent"]


# --- the operations ------------------------------------------------------------------------


def test_deletion_never_empties_a_text():
    words = TEXT.split()
    for seed in range(20):
        assert random_deletion(["only"], 1.0, {}, rng(seed)) == ["only"]
        kept = random_deletion(words, 1.0, {}, rng(seed))
        assert len(kept) == 1 and kept[0] in words
        partial = random_deletion(words, 0.3, {}, rng(seed))
        assert partial and all(word in words for word in partial)
    assert random_deletion(words, 0.0, {}, rng()) == words


def test_swap_keeps_the_words_and_changes_the_order():
    words = TEXT.split()
    swapped = [random_swap(words, 0.2, {}, rng(seed)) for seed in range(10)]
    assert all(Counter(s) == Counter(words) for s in swapped)
    assert any(s != words for s in swapped)


def test_insertion_adds_synonyms_from_the_table():
    words = TEXT.split()  # 14 words: n = max(1, round(0.2 * 14)) = 3 insertions
    for seed in range(10):
        longer = random_insertion(words, 0.2, SYNONYMS, rng(seed))
        added = Counter(longer) - Counter(words)
        assert sum(added.values()) == 3
        assert set(added) <= {s for synonyms in SYNONYMS.values() for s in synonyms}
    assert random_insertion(["no", "match"], 0.5, SYNONYMS, rng()) == ["no", "match"]


def test_synonym_replacement_uses_the_table_and_keeps_case_and_punctuation():
    words = ["Good", "film,", "bad", "food."]  # n = max(1, round(0.5 * 4)) = 2
    for seed in range(10):
        replaced = synonym_replacement(words, 0.5, SYNONYMS, rng(seed))
        changed = [(a, b) for a, b in zip(words, replaced, strict=True) if a != b]
        assert len(changed) == 2
        allowed = {
            "Good": {"Great", "Fine"},
            "film,": {"movie,", "picture,"},
            "bad": {"awful"},
            "food.": {"the meal."},
        }
        assert all(new in allowed[old] for old, new in changed)


# --- variants: a pure function of (seed, epoch, row, copy) ---------------------------------


SETTINGS = AugmentConfig(copies=2, synonyms="table")


def test_variant_is_deterministic_and_varies_with_every_input():
    base = augment_text(TEXT, SETTINGS, SYNONYMS, 42, 0, 5, 1)
    assert base == augment_text(TEXT, SETTINGS, SYNONYMS, 42, 0, 5, 1)

    def variants(**change) -> set[str]:
        keys = {"seed": 42, "epoch": 0, "row": 5, "copy": 1}
        out = set()
        for value in range(1, 9):
            args = keys | {name: value for name in change}
            out.add(augment_text(TEXT, SETTINGS, SYNONYMS, *args.values()))
        return out

    for name in ("seed", "epoch", "row", "copy"):
        assert len(variants(**{name: True}) - {base}) >= 5, name


def test_a_disabled_operation_is_never_chosen():
    only_swap = AugmentConfig(copies=1, deletion=0, insertion=0, synonym_replacement=0)
    for epoch in range(10):
        variant = augment_text(TEXT, only_swap, {}, 0, epoch, 0, 1)
        assert Counter(variant.split()) == Counter(TEXT.split())


@pytest.fixture
def augmented(data_dir, bert_tokenizer, tmp_path):
    (tmp_path / "syn.tsv").write_text(TABLE)
    raw = {
        "task": "classification",
        "model": {"name_or_path": "m"},
        "data": {
            "train": str(data_dir / "sentiment_train.csv"),
            "max_length": 32,
            "augment": {"copies": 2, "synonyms": str(tmp_path / "syn.tsv")},
        },
    }
    cfg = build_config(raw, world_size=1)
    split = read_split(cfg.data.train, "data.train", LABELLED_TEXT, cfg.data)
    encoded = encode_classification(split, bert_tokenizer, {"negative": 0, "positive": 1}, 32)
    texts = [row["text"] for row in split.rows]
    return AugmentedDataset(encoded, texts, bert_tokenizer, cfg), encoded, split, cfg


def test_dataset_is_the_originals_then_the_variants(augmented, bert_tokenizer):
    dataset, encoded, split, cfg = augmented
    rows = len(encoded)
    assert len(dataset) == 3 * rows
    assert dataset[(0, 7)]["input_ids"] == encoded[7]["input_ids"]
    assert dataset[(3, 7)]["input_ids"] == encoded[7]["input_ids"]  # originals never change
    variant = dataset[(0, 2 * rows + 7)]  # copy 2 of row 7
    text = augment_text(split.rows[7]["text"], cfg.data.augment, dataset.synonyms, 42, 0, 7, 2)
    assert variant["input_ids"] == bert_tokenizer(text, truncation=True, max_length=32)["input_ids"]
    assert variant["labels"] == encoded[7]["labels"]
    assert set(variant) == {*encoded.column_names, "seed"}


def test_variants_change_every_epoch(augmented):
    dataset, encoded, _, _ = augmented
    rows = len(encoded)
    epoch0 = [dataset[(0, rows + i)]["input_ids"] for i in range(20)]
    epoch1 = [dataset[(1, rows + i)]["input_ids"] for i in range(20)]
    assert sum(a != b for a, b in zip(epoch0, epoch1, strict=True)) >= 10


# --- config and an end-to-end run ----------------------------------------------------------


def config_error(task: str = "classification", **augment) -> str:
    raw = {"task": task, "model": {"name_or_path": "m"}, "data": {"train": "t.csv"}}
    raw["data"]["augment"] = augment
    with pytest.raises(UserError) as caught:
        build_config(raw, world_size=1)
    return str(caught.value)


def test_augmentation_config_errors(tmp_path):
    assert config_error("mlm", copies=1, synonyms=None, insertion=0, synonym_replacement=0) == (
        "data.augment.copies: only for task classification, not 'mlm'"
    )
    assert config_error(copies=1) == (
        "data.augment.synonyms: insertion and synonym_replacement need a synonym table "
        "(or set them to 0)"
    )
    missing = tmp_path / "nope.tsv"
    assert config_error(copies=1, synonyms=str(missing)) == (
        f"data.augment.synonyms: file not found: {missing}"
    )
    assert "data.augment.swap: must be in [0, 1], got 1.5" in config_error(copies=1, swap=1.5)
    assert "unknown key 'data.augment.copy' (did you mean 'data.augment.copies'?)" in (
        config_error(copy=1)
    )


def test_keys_lists_the_third_level(capsys):
    reset_accelerate()
    assert main(["keys"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "data.augment.copies" in listed and "data.augment.synonyms" in listed
    assert "data.augment" not in listed and "data.class_weights" in listed


def test_copies_grow_the_train_split_only(run_config, tmp_path):
    config = run_config(
        "classification",
        data={"augment": {"copies": 1, "insertion": 0, "synonym_replacement": 0}},
        train={"epochs": 1},
    )
    reset_accelerate()
    assert main(["train", str(config)]) == 0
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert (summary["train_examples"], summary["examples_per_epoch"]) == (192, 384)
    assert summary["steps_per_epoch"] == 384 // 8  # without copies: 24
    assert summary["validation_examples"] == 48
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["steps"] == 48 and sum(map(sum, results["confusion_matrix"])) == 48
