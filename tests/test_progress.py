"""trainer/progress.py: bars on the long steps, drawn by rank 0 only, only on a terminal
(or when forced), never with --no-progress; tokenizing in groups moves them and gives the
same ids as one call."""

from __future__ import annotations

import io
import json
import os

import pytest
from conftest import reset_accelerate

from trainer import progress
from trainer.cli import main
from trainer.data.encode import PACK_GROUP, tokenize


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_forced_setting(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)


def test_bars_show_on_a_terminal_of_the_main_process_only(monkeypatch):
    assert progress.enabled(Terminal())
    assert not progress.enabled(io.StringIO()), "a file or a pipe gets no bar"
    monkeypatch.setenv("RANK", "1")
    assert not progress.enabled(Terminal()), "one bar per job, not one per process"


@pytest.mark.parametrize(("forced", "terminal", "shown"), [("0", True, False), ("1", False, True)])
def test_the_environment_decides_first(monkeypatch, forced, terminal, shown):
    monkeypatch.setenv(progress.PROGRESS_ENV, forced)
    assert progress.enabled(Terminal() if terminal else io.StringIO()) is shown
    monkeypatch.setenv("RANK", "3")
    assert not progress.enabled(Terminal()), "not even forced on another rank"


def test_launch_passes_its_decision_to_the_processes_it_starts(monkeypatch):
    assert progress.child_environment() == {progress.PROGRESS_ENV: "0"}  # pytest: no terminal
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    assert progress.child_environment() == {progress.PROGRESS_ENV: "1"}


def prepare(capsys, *argv) -> tuple[int, str, str]:
    reset_accelerate()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prepare_draws_a_tokenize_bar_unless_no_progress(capsys, run_config, tmp_path, monkeypatch):
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")  # as a terminal would
    config = run_config("classification", data={"cache_dir": str(tmp_path / "cache")})
    code, out, err = prepare(capsys, "prepare", config)
    assert code == 0
    assert "tokenize train-0: 100%" in err and "192/192" in err, err
    assert "tokenize validation: 100%" in err
    assert json.loads(out.splitlines()[-1])["train_examples"] == [192]

    config = run_config("classification", data={"cache_dir": str(tmp_path / "other")})
    code, out, err = prepare(capsys, "--no-progress", "prepare", config)
    assert code == 0 and "tokenize train-0" not in err, err
    assert json.loads(out.splitlines()[-1])["status"] == "built", "it did tokenize"
    assert os.environ[progress.PROGRESS_ENV] == "1", "the setting is the command's only"


def test_without_a_terminal_there_is_no_bar(capsys, run_config, tmp_path):
    config = run_config("classification", data={"cache_dir": str(tmp_path / "cache")})
    code, out, err = prepare(capsys, "prepare", config)
    assert code == 0 and "tokenize train-0" not in err, err
    assert json.loads(out.splitlines()[-1])["status"] == "built"


def test_grouped_tokenizing_moves_the_bar_and_matches_one_call(bert_tokenizer, monkeypatch):
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    words = [f"word{i} and more text {i % 7}".split() for i in range(PACK_GROUP * 2 + 5)]
    with progress.counting(len(words), "tokenize") as shown:
        grouped = tokenize(bert_tokenizer, words, is_split_into_words=True)
        assert shown.n == len(words)
    whole = bert_tokenizer(words, is_split_into_words=True)
    assert grouped["input_ids"] == whole["input_ids"]
    last = len(words) - 1
    assert grouped.word_ids(last) == whole.word_ids(last), "word ids index the whole input"
