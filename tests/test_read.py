"""trainer.data.read: readers keep where each row came from; bad rows are named; labels ordered."""

from __future__ import annotations

import json

import pytest
from conftest import write_csv, write_jsonl

from trainer.config import DataConfig
from trainer.data.read import (
    LABELLED_TEXT,
    TAGGED_WORDS,
    TEXT,
    Split,
    carve_validation,
    check_labels,
    label_names_from,
    looks_like_file,
    read_split,
)
from trainer.errors import UserError


def test_csv_rows_are_checked_and_located(tmp_path):
    path = write_csv(
        tmp_path / "reviews.csv",
        [
            {"text": "good film", "label": "positive", "extra": "x"},
            {"text": "bad film", "label": "negative", "extra": "y"},
        ],
    )
    split = read_split(str(path), "data.train", LABELLED_TEXT, DataConfig())
    assert split.rows == [
        {"text": "good film", "label": "positive"},
        {"text": "bad film", "label": "negative"},
    ]
    assert split.where == ["reviews.csv row 1", "reviews.csv row 2"]
    assert split.key == "data.train"


def test_tsv_and_integer_labels(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("sentence\ty\nhello there\t1\nbye\t0\n")
    cfg = DataConfig(text_column="sentence", label_column="y")
    split = read_split(str(path), "data.train", LABELLED_TEXT, cfg)
    assert [row["label"] for row in split.rows] == ["1", "0"]
    assert label_names_from(split, LABELLED_TEXT) == ["0", "1"]


def test_numeric_labels_sort_by_value():
    split = Split("data.train", [{"text": "t", "label": v} for v in ("10", "2", "1")], ["?"] * 3)
    assert label_names_from(split, LABELLED_TEXT) == ["1", "2", "10"]


def test_json_list_and_json_lines(tmp_path):
    rows = [{"text": "a b", "label": 1}, {"text": "c d", "label": 0}]
    as_list = tmp_path / "l.json"
    as_list.write_text(json.dumps(rows))
    as_lines = write_jsonl(tmp_path / "j.json", rows)
    for path in (as_list, as_lines):
        split = read_split(str(path), "data.train", LABELLED_TEXT, DataConfig())
        assert [row["label"] for row in split.rows] == ["1", "0"]


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "ner.jsonl"
    path.write_text('{"tokens": ["a"], "tags": ["O"]}\n\n{"tokens": ["b"], "tags": \n')
    with pytest.raises(UserError, match=r"^data.train: ner.jsonl line 3: not valid JSON"):
        read_split(str(path), "data.train", TAGGED_WORDS, DataConfig())


def test_empty_text_names_the_row(tmp_path):
    path = write_csv(
        tmp_path / "t.csv",
        [
            {"text": "fine", "label": "a"},
            {"text": "   ", "label": "b"},
        ],
    )
    with pytest.raises(UserError, match=r"t.csv row 2: empty text in column 'text'"):
        read_split(str(path), "data.validation", LABELLED_TEXT, DataConfig())


def test_missing_column_lists_the_columns(tmp_path):
    path = write_csv(tmp_path / "t.csv", [{"sentence": "fine", "label": "a"}])
    with pytest.raises(UserError, match=r"missing column 'text' \(columns: sentence, label\)"):
        read_split(str(path), "data.train", LABELLED_TEXT, DataConfig())


def test_short_and_long_csv_rows(tmp_path):
    long_row = tmp_path / "long.csv"
    long_row.write_text("text,label\ngood,pos\nbad,neg,extra\n")
    with pytest.raises(UserError, match=r"long\.csv row 2: more fields than the header"):
        read_split(str(long_row), "data.train", LABELLED_TEXT, DataConfig())
    short_row = tmp_path / "short.csv"
    short_row.write_text("text,label\ngood,pos\nbad\n")
    with pytest.raises(UserError, match=r"short\.csv row 2: empty label"):
        read_split(str(short_row), "data.train", LABELLED_TEXT, DataConfig())


def test_token_classification_rows_must_align(tmp_path):
    path = write_jsonl(
        tmp_path / "n.jsonl",
        [
            {"tokens": ["Alice", "visited", "Paris"], "tags": ["B-PER", "O", "B-LOC"]},
            {"tokens": ["Bob", "left"], "tags": ["B-PER"]},
        ],
    )
    with pytest.raises(UserError, match=r"n\.jsonl line 2: 'tags' must be a list as long"):
        read_split(str(path), "data.train", TAGGED_WORDS, DataConfig())


def test_conll_reader_groups_sentences(tmp_path):
    path = tmp_path / "v.conll"
    path.write_text("-DOCSTART- O\n\nAlice NNP B-PER\nsmiled VBD O\n\n\nBob NNP B-PER\n")
    split = read_split(str(path), "data.validation", TAGGED_WORDS, DataConfig())
    assert split.rows == [
        {"tokens": ["Alice", "smiled"], "tags": ["B-PER", "O"]},
        {"tokens": ["Bob"], "tags": ["B-PER"]},
    ]
    assert split.where == ["v.conll line 3", "v.conll line 7"]


def test_text_lines_skip_blank_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first doc\n\n  \nsecond doc\n")
    split = read_split(str(path), "data.train", TEXT, DataConfig())
    assert split.rows == [{"text": "first doc"}, {"text": "second doc"}]
    assert split.where == ["t.txt line 1", "t.txt line 4"]


def test_text_file_cannot_feed_classification(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("some text\n")
    with pytest.raises(UserError, match="has no labels"):
        read_split(str(path), "data.train", LABELLED_TEXT, DataConfig())


def test_missing_file_names_key_and_path(tmp_path):
    missing = str(tmp_path / "absent.csv")
    with pytest.raises(UserError, match=f"^data.validation: file not found: {missing}$"):
        read_split(missing, "data.validation", LABELLED_TEXT, DataConfig())
    assert looks_like_file("data/x.parquet") and looks_like_file("./x")
    assert not looks_like_file("glue")


def test_empty_file_holds_no_examples(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    with pytest.raises(UserError, match="holds no examples"):
        read_split(str(path), "data.train", TEXT, DataConfig())


def test_ner_label_order_puts_O_first_then_by_type():
    rows = [{"tokens": ["x"] * 4, "tags": ["I-PER", "B-LOC", "O", "B-PER"]}]
    split = Split("data.train", rows, ["r1"])
    assert label_names_from(split, TAGGED_WORDS) == ["O", "B-LOC", "B-PER", "I-PER"]


def test_unknown_label_names_row_and_label():
    split = Split(
        "data.validation",
        [{"text": "a", "label": "pos"}, {"text": "b", "label": "neutral"}],
        ["v.csv row 1", "v.csv row 2"],
    )
    with pytest.raises(UserError) as caught:
        check_labels(split, ["neg", "pos"], LABELLED_TEXT)
    message = str(caught.value)
    assert message.startswith("data.validation: v.csv row 2: unknown label 'neutral'")
    assert "known: neg, pos" in message


def test_carved_validation_is_seeded_and_disjoint():
    rows = [{"text": str(i)} for i in range(50)]
    train = Split("data.train", rows, [f"row {i}" for i in range(50)])
    kept, held = carve_validation(train, 0.2, seed=3)
    again_kept, again_held = carve_validation(train, 0.2, seed=3)
    other = carve_validation(train, 0.2, seed=4)[1]
    assert len(held) == 10 and len(kept) == 40
    assert {r["text"] for r in kept.rows}.isdisjoint(r["text"] for r in held.rows)
    assert held.rows == again_held.rows and kept.rows == again_kept.rows
    assert held.rows != other.rows
    assert held.key == "data.validation_split"
    assert held.where == [f"row {r['text']}" for r in held.rows]


def test_carving_everything_is_an_error():
    train = Split("data.train", [{"text": "a"}], ["r1"])
    with pytest.raises(UserError, match="leaves no training rows"):
        carve_validation(train, 0.5, seed=0)
