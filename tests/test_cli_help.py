"""The `trainer` command line explains itself: `--version`, a help text for every option
and argument of every (sub-)command, their defaults shown, and example command lines in
every command's epilog."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from trainer.cli import RUNNERS, main
from trainer.cli_parser import build_parser
from trainer.commands.predict import INPUT_SUFFIXES

REPO = Path(__file__).resolve().parent.parent


def every_parser() -> list[tuple[str, argparse.ArgumentParser]]:
    """(command path, parser) for `trainer` and each of its sub-commands, nested ones too."""
    found, todo = [], [("trainer", build_parser(RUNNERS))]
    while todo:
        name, parser = todo.pop()
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {sub}", p) for sub, p in action.choices.items()]
    return found


PARSERS = every_parser()


def test_the_walk_finds_every_command():
    names = {name for name, _ in PARSERS}
    assert {"trainer train", "trainer predict", "trainer tokenizer extend", "trainer submit"} <= (
        names
    )
    assert len(names) == 15  # trainer, 12 commands, tokenizer train and extend


@pytest.mark.parametrize(("name", "parser"), PARSERS, ids=[name for name, _ in PARSERS])
def test_every_option_and_argument_has_a_help_text(name, parser):
    missing = [
        "/".join(action.option_strings) or action.dest
        for action in parser._actions
        if not (action.help and action.help.strip())
    ]
    assert missing == [], f"{name}: no help for {missing}"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            silent = [choice.dest for choice in action._choices_actions if not choice.help]
            assert silent == [], f"{name}: sub-commands without help: {silent}"


@pytest.mark.parametrize(("name", "parser"), PARSERS, ids=[name for name, _ in PARSERS])
def test_every_command_has_example_lines_in_its_epilog(name, parser):
    epilog = parser.epilog or ""
    assert epilog.startswith("examples:"), f"{name}: no examples"
    lines = [line.strip() for line in epilog.splitlines()[1:]]
    assert lines and all(line.startswith("trainer ") for line in lines), lines
    if name != "trainer":
        assert any(line.startswith(name) for line in lines), f"{name}: examples of another"
    assert "examples:\n  trainer " in parser.format_help(), "printed as written"


def test_help_shows_the_defaults_that_mean_something():
    predict = dict(PARSERS)["trainer predict"].format_help()
    assert "inputs per forward pass (default: 32)" in predict
    assert "(default: no)" in predict and "clm: 0 is greedy (default: 0.0)" in predict
    assert "(default: None)" not in predict and "(default: [])" not in predict


def test_predict_input_help_names_every_format_it_reads():
    (input_option,) = [a for a in dict(PARSERS)["trainer predict"]._actions if a.dest == "input"]
    words = set(re.findall(r"\w+", input_option.help))
    unnamed = [suffix for suffix in INPUT_SUFFIXES if suffix.lstrip(".") not in words]
    assert unnamed == [], f"--input help does not name {unnamed}"


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"trainer {version('steadytrain')}\n"


def test_version_from_the_console_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "trainer", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == f"trainer {version('steadytrain')}"
