"""What `--help` shows for every (sub-)command of `trainer`: each option's help with its
default, and an epilog of example command lines kept as written."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help (ArgumentDefaultsHelpFormatter), epilogs line by line
    (RawDescriptionHelpFormatter). A default that says nothing (None, False, an empty list:
    an option left out) is not shown: "(default: None)" after every optional path is noise."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class HelpfulParser(argparse.ArgumentParser):
    """An ArgumentParser that formats its help with HelpFormatter; `add_subparsers` makes
    its sub-command parsers of the same class, so every level does."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def examples(*command_lines: str) -> str:
    """An epilog listing example command lines."""
    return "examples:\n" + "\n".join(f"  {line}" for line in command_lines)
