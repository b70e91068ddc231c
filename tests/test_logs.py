"""trainer/logs.py: notes and warnings go through logging, not print. The CLI's --quiet and
--verbose set the level and the last stdout line stays the results' JSON; a Python caller
silences or captures the messages with standard logging configuration; other ranks keep
quiet; a warning is written above an open progress bar."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import yaml
from conftest import reset_accelerate

from trainer import progress
from trainer.cli import main
from trainer.logs import PER_RANK, ConsoleFormatter, get_logger


def cli(capsys, *argv) -> tuple[int, str, str]:
    reset_accelerate()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def headless_mlm(run_config, tmp_path) -> tuple[Path, str]:
    """A BERT without its MLM head, and a text file: scoring it as MLM warns (the head is
    drawn at random)."""
    from transformers import AutoModel, AutoTokenizer

    source = Path(yaml.safe_load(Path(run_config("mlm")).read_text())["model"]["name_or_path"])
    headless = tmp_path / "headless"
    AutoModel.from_pretrained(source).save_pretrained(headless)
    AutoTokenizer.from_pretrained(source).save_pretrained(headless)
    data = yaml.safe_load(Path(run_config("mlm")).read_text())["data"]["validation"]
    return headless, data


def test_quiet_silences_the_notes_but_not_the_results(capsys, run_config, tmp_path):
    config = run_config("classification", train={"max_steps": 2})
    code, out, err = cli(capsys, "train", config)
    assert code == 0
    assert '"total_steps": 2' in err, "the run summary is a note on stderr"
    results = last_json(out)

    config = run_config(
        "classification", train={"max_steps": 2}, output_dir=str(tmp_path / "quiet")
    )
    code, out, err = cli(capsys, "--quiet", "train", config)
    assert code == 0
    assert err == "", err
    assert last_json(out).keys() == results.keys()


def test_verbose_shows_debug_lines(capsys, run_config):
    config = run_config("classification")
    code, out, err = cli(capsys, "prepare", config)
    assert code == 0 and "debug:" not in err, err
    code, out, err = cli(capsys, "--verbose", "prepare", config)
    assert code == 0
    assert "debug: trainer.data.prepare: tokenized data: cache " in err, err
    assert last_json(out)["train_examples"] == [192]


def test_quiet_and_verbose_exclude_each_other(capsys, run_config):
    with pytest.raises(SystemExit) as stopped:
        main(["--quiet", "--verbose", "prepare", str(run_config("classification"))])
    assert stopped.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_python_caller_silences_or_captures_the_messages(headless_mlm, capsys, caplog):
    from trainer.commands.evaluate import score

    headless, data = headless_mlm
    assert logging.getLogger("trainer").handlers == [], "the library adds no handler"
    with caplog.at_level(logging.WARNING, logger="trainer"):
        score(str(headless), data, ["task=mlm"])
    warned = [r for r in caplog.records if "has no trained mlm head" in r.getMessage()]
    assert [r.name for r in warned] == ["trainer.model.load"]
    caplog.clear()

    reset_accelerate()
    logging.getLogger("trainer").setLevel(logging.ERROR)
    try:
        score(str(headless), data, ["task=mlm"])
    finally:
        logging.getLogger("trainer").setLevel(logging.NOTSET)
    assert [r for r in caplog.records if r.name.startswith("trainer")] == []
    assert "no trained mlm head" not in capsys.readouterr().err  # (transformers has its own)


def test_the_cli_leaves_the_loggers_as_they_were(capsys, run_config):
    before = logging.getLogger("trainer").level
    assert cli(capsys, "--verbose", "prepare", run_config("classification"))[0] == 0
    assert logging.getLogger("trainer").handlers == []
    assert logging.getLogger("trainer").level == before


def test_other_ranks_keep_only_errors_and_their_own_warnings(monkeypatch, caplog):
    logger = get_logger("trainer.test_logs")
    monkeypatch.setenv("RANK", "1")
    with caplog.at_level(logging.DEBUG, logger="trainer"):
        logger.info("a note")
        logger.warning("a warning every rank would repeat")
        logger.warning("what this rank saw", extra=PER_RANK)
        logger.error("a failure")
    assert [r.getMessage() for r in caplog.records] == ["what this rank saw", "a failure"]
    assert ConsoleFormatter().format(caplog.records[0]) == "warning: [rank 1] what this rank saw"
    monkeypatch.setenv("RANK", "0")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer"):
        logger.info("a note")
    assert [r.getMessage() for r in caplog.records] == ["a note"]


def test_console_lines_keep_the_format_the_commands_printed():
    def line(level: int, message: str) -> str:
        record = logging.LogRecord("trainer.x", level, __file__, 1, message, (), None)
        return ConsoleFormatter().format(record)

    assert line(logging.INFO, "resuming from ckpt (step 2)") == "resuming from ckpt (step 2)"
    assert line(logging.WARNING, "model.trust_remote_code is on") == (
        "warning: model.trust_remote_code is on"
    )
    assert line(logging.DEBUG, "cache hit") == "debug: trainer.x: cache hit"


def test_a_warning_is_written_above_an_open_progress_bar(monkeypatch, capsys):
    from trainer.logs import console

    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    with console(logging.INFO):
        shown = progress.bar(desc="train", total=10)
        shown.update(3)
        get_logger("trainer.test_logs").warning("non-finite loss at step 3")
        shown.close()
    err = capsys.readouterr().err
    cleared, _, after = err.partition("warning: non-finite loss at step 3\n")
    assert cleared.endswith("\r"), "the bar's line is cleared before the warning"
    assert "train:" in cleared and "train:" in after, "and drawn again below it"


def test_a_plain_stream_handler_of_a_caller_gets_the_records(monkeypatch):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("trainer").addHandler(handler)
    try:
        get_logger("trainer.data.prepare").warning("redirected")
    finally:
        logging.getLogger("trainer").removeHandler(handler)
    assert stream.getvalue() == "redirected\n"
