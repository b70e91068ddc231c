"""`trainer data-stats` on small files whose figures are computed by hand below."""

from __future__ import annotations

import json

import pytest
from conftest import reset_accelerate, write_csv

from trainer.cli import main
from trainer.commands.data_stats import percentile, suggest_max_length
from trainer.config import DataConfig
from trainer.data.encode import pack_for_clm, pack_for_mlm
from trainer.data.read import LABELLED_TEXT, TAGGED_WORDS, TEXT, read_split
from trainer.errors import UserError

# Every word here is one token of the tiny BERT (checked below), so a text of w words is
# w + 2 tokens with [CLS] and [SEP].
TRAIN = [
    ("good film", "positive"),  # 4 tokens
    ("bad film", "negative"),  # 4
    ("good film", "positive"),  # 4, repeats row 1
    ("", "positive"),  # empty: counted, not read
    ("good food and room", "positive"),  # 6
    ("bad food", "negative"),  # 4
    ("bad film and bad food with pain", "negative"),  # 9
    ("good film", "negative"),  # 4, repeats row 1 with another label
    ("the room was good and the food was very good", "positive"),  # 12
    ("good", "positive"),  # 3
]
VALIDATION = [
    ("good film", "positive"),  # in train
    ("bad food", "negative"),  # in train
    ("very good room", "positive"),
    ("good film", "positive"),  # in train, repeats row 1
]


def rows(pairs):
    return [{"text": text, "label": label} for text, label in pairs]


@pytest.fixture
def stats_config(run_config, tmp_path):
    """A classification run config on the files above, max_length 8."""
    write_csv(tmp_path / "train.csv", rows(TRAIN))
    write_csv(tmp_path / "validation.csv", rows(VALIDATION))

    def make(**data):
        values = {"train": str(tmp_path / "train.csv"), "max_length": 8}
        values |= {"validation": str(tmp_path / "validation.csv")} | data
        return run_config("classification", data=values)

    return make


def data_stats(capsys, *argv) -> tuple[int, str, str]:
    reset_accelerate()
    code = main(["data-stats", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_words_are_single_tokens(bert_tokenizer):
    words = {word for text, _ in TRAIN + VALIDATION for word in text.split()}
    assert all(len(bert_tokenizer.tokenize(word)) == 1 for word in words)


def test_figures_of_a_known_file(stats_config, tmp_path, capsys):
    out_file = tmp_path / "stats.json"
    code, out, _ = data_stats(capsys, stats_config(), "--json", out_file)
    assert code == 0
    report = json.loads(out_file.read_text())
    train = report["splits"]["train"]
    # lengths 4 4 4 6 4 9 4 12 3 -> sorted 3 4 4 4 4 4 6 9 12 (n = 9, sum 50)
    assert train["rows"] == 9
    assert train["tokens"] == {"mean": 5.56, "p50": 4, "p95": 12, "p99": 12, "max": 12}
    assert (train["truncated_rows"], train["truncated_share"]) == (2, 0.2222)  # 9 and 12 > 8
    assert train["suggested_max_length"] == 16  # p99 12 rounded up to a multiple of 8
    assert (train["empty_rows"], train["empty_where"]) == (1, ["train.csv row 4"])
    assert train["duplicate_rows"] == 2
    assert train["duplicate_where"] == ["train.csv row 3", "train.csv row 8"]
    assert train["conflicting_labels"] == 1
    assert train["labels"] == {
        "positive": {"count": 5, "share": 0.5556},
        "negative": {"count": 4, "share": 0.4444},
    }
    validation = report["splits"]["validation"]
    assert validation["rows"] == 4
    assert validation["tokens"] == {"mean": 4.25, "p50": 4, "p95": 5, "p99": 5, "max": 5}
    assert (validation["duplicate_rows"], validation["conflicting_labels"]) == (1, 0)
    assert report["overlap"] == {"texts": 2, "validation_rows": 3, "validation_share": 0.75}
    assert report["model_max_positions"] == 256
    # the printed table carries the same figures
    assert "truncated at 8" in out and "2 (22.2%)" in out
    assert "train: empty rows at train.csv row 4" in out
    assert "2 texts in both splits, 3 validation rows (75.0%)" in out
    assert out.strip().endswith(f"wrote {out_file}")


def test_training_still_rejects_the_empty_row(stats_config, tmp_path):
    with pytest.raises(UserError, match=r"train\.csv row 4: empty text"):
        read_split(str(tmp_path / "train.csv"), "data.train", LABELLED_TEXT, DataConfig())


def test_report_goes_to_data_stats_json_in_the_output_dir(
    run_config, tmp_path, monkeypatch, capsys
):
    """Not into whatever folder the command was started from; the run then trains there."""
    config = run_config("classification")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, out, _ = data_stats(capsys, config)
    report = tmp_path / "run" / "data-stats.json"
    assert code == 0 and report.is_file() and not list((tmp_path / "elsewhere").iterdir())
    assert out.strip().splitlines()[-1] == f"wrote {report}"
    reset_accelerate()
    assert main(["train", str(config)]) == 0
    assert report.is_file() and (tmp_path / "run" / "final").is_dir()


def test_validation_split_is_carved_as_training_would(stats_config, tmp_path, capsys):
    config = stats_config(validation=None, validation_split=0.25)
    code, _, _ = data_stats(capsys, config, "--json", tmp_path / "s.json")
    assert code == 0
    splits = json.loads((tmp_path / "s.json").read_text())["splits"]
    assert (splits["train"]["rows"], splits["validation"]["rows"]) == (7, 2)
    assert splits["validation"]["key"] == "data.validation_split"


def test_overrides_and_unwritable_report_path(stats_config, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")  # a file where the report's folder should be
    code, _, err = data_stats(
        capsys, stats_config(), "data.max_length=16", "--json", tmp_path / "a-file" / "s.json"
    )
    assert code == 2
    assert err.startswith("error: --json: could not write") and err.count("\n") == 1


@pytest.mark.parametrize("task, pack", [("mlm", pack_for_mlm), ("clm", pack_for_clm)])
def test_packed_blocks_match_what_training_packs(
    run_config, data_dir, tmp_path, capsys, task, pack, tiny_models_by_task
):
    from transformers import AutoTokenizer

    config = run_config(task, data={"max_length": 32})
    code, out, _ = data_stats(capsys, config, "--json", tmp_path / "s.json")
    assert code == 0
    train = json.loads((tmp_path / "s.json").read_text())["splits"]["train"]
    tokenizer = AutoTokenizer.from_pretrained(
        tiny_models_by_task["clm" if task == "clm" else "bert"]
    )
    split = read_split(str(data_dir / "text.txt"), "data.train", TEXT, DataConfig())
    assert train["packed_blocks"] == len(pack(split, tokenizer, 32))
    assert train["total_tokens"] // 32 >= train["packed_blocks"]
    assert "truncated_rows" not in train and "blocks of 32" in out


def test_token_classification_counts_tags(run_config, data_dir, tmp_path, capsys):
    code, _, _ = data_stats(capsys, run_config("token-classification"), "--json", tmp_path / "s")
    assert code == 0
    train = json.loads((tmp_path / "s").read_text())["splits"]["train"]
    split = read_split(str(data_dir / "ner_train.jsonl"), "data.train", TAGGED_WORDS, DataConfig())
    assert train["rows"] == len(split) == 192
    assert set(train["labels"]) == {"O", "B-LOC", "B-PER", "B-ORG", "I-ORG"}
    words = sum(len(row["tokens"]) for row in split.rows)
    assert sum(label["count"] for label in train["labels"].values()) == words


def test_nearest_rank_percentile_and_the_cap():
    assert [percentile([1, 2, 3, 4], p) for p in (25, 50, 51, 100)] == [1, 2, 3, 4]
    assert percentile([7], 99) == 7
    assert suggest_max_length(33, 512) == 40
    assert suggest_max_length(40, 512) == 40
    assert suggest_max_length(700, 512) == 512


def test_missing_file_is_one_line(stats_config, tmp_path, capsys):
    code, _, err = data_stats(capsys, stats_config(train=str(tmp_path / "gone.csv")))
    assert code == 2
    assert err == f"error: data.train: file not found: {tmp_path / 'gone.csv'}\n"
