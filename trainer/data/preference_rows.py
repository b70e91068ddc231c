"""The rows of preference tuning: a prompt, a chosen answer and a rejected one.

Each is a string, or a list of chat messages (the prompt's turns, then the answers as
assistant turns); a string prompt with message answers is the user's turn. Rows are
checked into one of two shapes, which data/preference_encode.py turns into tokens through
supervised fine-tuning's chat path:

- `{"prompt": str, "chosen": str, "rejected": str}`;
- `{"prompt": [turns], "chosen": [assistant turns], "rejected": [assistant turns]}`.

A missing field, an empty answer or a chosen answer identical to the rejected one is one
line naming the file and row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.data.chat_rows import checked_messages
from trainer.data.read import EmptyValue, RowFormat
from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.config import DataConfig


def _answer(value: object, where: str, column: str) -> str | list[dict]:
    """A non-empty answer: a string, or assistant turns with non-empty contents."""
    if isinstance(value, str):
        if not value.strip():
            raise EmptyValue(f"{where}: empty answer in column '{column}'")
        return value
    turns = checked_messages(value, where, column)
    if not turns or any(turn["role"] != "assistant" for turn in turns):
        raise UserError(f"{where}: '{column}' must hold assistant turns only")
    if any(not turn["content"].strip() for turn in turns):
        raise EmptyValue(f"{where}: '{column}' has an empty assistant turn")
    return turns


def _prompt(value: object, where: str, column: str, as_messages: bool) -> str | list[dict]:
    """The prompt as text, or as turns when the answers are messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if as_messages else value
    if not as_messages:
        raise UserError(f"{where}: '{column}' holds messages, so the answers must too")
    return checked_messages(value, where, column)


def preference_row(row: dict, where: str, cfg: DataConfig) -> dict:
    """A checked prompt / chosen / rejected row."""
    columns = (cfg.prompt_column, cfg.chosen_column, cfg.rejected_column)
    missing = [column for column in columns if row.get(column) is None]
    if missing:
        keys = {cfg.prompt_column: "prompt", cfg.chosen_column: "chosen"}
        key = keys.get(missing[0], "rejected")
        raise UserError(
            f"{where}: missing column '{missing[0]}' (columns: {', '.join(map(str, row))}); "
            f"set data.{key}_column"
        )
    chosen = _answer(row[cfg.chosen_column], where, cfg.chosen_column)
    rejected = _answer(row[cfg.rejected_column], where, cfg.rejected_column)
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise UserError(f"{where}: chosen and rejected must both be text or both messages")
    if chosen == rejected:
        raise UserError(f"{where}: the chosen answer is identical to the rejected one")
    prompt = _prompt(row[cfg.prompt_column], where, cfg.prompt_column, not isinstance(chosen, str))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


PREFERENCE = RowFormat("preference pair", preference_row)
