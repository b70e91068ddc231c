"""The rows of supervised fine-tuning: prompt/completion pairs, chat messages, or
instruction/input/output (Alpaca) rows, checked into one of two shapes.

- `{"prompt": str, "completion": str}`: plain text, the completion ends with EOS;
- `{"messages": [{role, content}, ...]}`: a conversation, rendered by the chat template.

A conversational prompt/completion pair (lists of messages on both sides) and an Alpaca
row (the instruction, and its input after a blank line, as the user's turn; the output as
the assistant's) become `messages`, so that both are rendered by the template and trained on
their assistant turns. Each problem names the file and row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainer.data.read import ID_COLUMN, TEXT_WITH_ID, EmptyValue, RowFormat
from trainer.errors import UserError

if TYPE_CHECKING:
    from trainer.config import DataConfig

ROLES = ("system", "user", "assistant")
ALPACA = ("instruction", "output")  # and an optional `input`


def checked_messages(value: object, where: str, column: str) -> list[dict]:
    """A list of {role, content} turns with known roles and string contents."""
    if not isinstance(value, list):
        raise UserError(f"{where}: '{column}' must be a list of {{role, content}} messages")
    turns = []
    for number, turn in enumerate(value, start=1):
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            raise UserError(f"{where}: '{column}' message {number} needs a role and a content")
        if turn["role"] not in ROLES:
            raise UserError(
                f"{where}: '{column}' message {number} has the unknown role {turn['role']!r} "
                f"(roles: {', '.join(ROLES)})"
            )
        if not isinstance(turn["content"], str):
            raise UserError(f"{where}: '{column}' message {number}: content must be a string")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns


def _checked_conversation(turns: list[dict], where: str, column: str) -> dict:
    """At least one assistant turn, and no empty answer."""
    answers = [t for t in turns if t["role"] == "assistant"]
    if not answers:
        raise UserError(f"{where}: '{column}' has no assistant turn to train on")
    if any(not t["content"].strip() for t in answers):
        raise EmptyValue(f"{where}: '{column}' has an empty assistant turn")
    return {"messages": turns}


def _pair(row: dict, where: str, cfg: DataConfig) -> dict:
    prompt, completion = row[cfg.prompt_column], row.get(cfg.completion_column)
    if completion is None:
        columns = ", ".join(map(str, row))
        raise UserError(
            f"{where}: missing column '{cfg.completion_column}' (columns: {columns}); set "
            "data.completion_column"
        )
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise EmptyValue(f"{where}: empty answer in column '{cfg.completion_column}'")
        return {"prompt": prompt, "completion": completion}
    asked = checked_messages(prompt, where, cfg.prompt_column)
    answered = checked_messages(completion, where, cfg.completion_column)
    if any(turn["role"] != "assistant" for turn in answered):
        raise UserError(f"{where}: '{cfg.completion_column}' may hold assistant turns only")
    return _checked_conversation(asked + answered, where, cfg.completion_column)


def _alpaca(row: dict, where: str) -> dict:
    instruction, extra, output = row["instruction"], row.get("input") or "", row["output"]
    if not all(isinstance(v, str) for v in (instruction, extra, output)):
        raise UserError(f"{where}: instruction, input and output must be strings")
    asked = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    turns = [{"role": "user", "content": asked}, {"role": "assistant", "content": output}]
    return _checked_conversation(turns, where, "output")


def chat_row(row: dict, where: str, cfg: DataConfig) -> dict:
    """A row in one of the three formats, by the columns it has."""
    if cfg.messages_column in row:
        turns = checked_messages(row[cfg.messages_column], where, cfg.messages_column)
        return _checked_conversation(turns, where, cfg.messages_column)
    if cfg.prompt_column in row:
        return _pair(row, where, cfg)
    if all(column in row for column in ALPACA):
        return _alpaca(row, where)
    columns = ", ".join(map(str, row))
    raise UserError(
        f"{where}: expected a '{cfg.messages_column}' column, '{cfg.prompt_column}' and "
        f"'{cfg.completion_column}', or instruction/input/output (columns: {columns}); "
        "set data.messages_column or data.prompt_column"
    )


CHAT = RowFormat("chat", chat_row)


def prompt_row(row: dict, where: str, cfg: DataConfig) -> dict:
    """What `trainer predict` answers: a conversation so far (`data.messages_column`), whose
    last turn is the user's, or a plain text taken as the user's turn; plus its `id`."""
    if cfg.messages_column not in row:
        return TEXT_WITH_ID.check(row, where, cfg)
    turns = checked_messages(row[cfg.messages_column], where, cfg.messages_column)
    if not turns or turns[-1]["role"] != "user":
        raise UserError(
            f"{where}: '{cfg.messages_column}' must end with a user turn, the one to answer"
        )
    return {"messages": turns, **({ID_COLUMN: row[ID_COLUMN]} if ID_COLUMN in row else {})}


# sft predictions: conversations or plain prompts (a .txt file: one prompt per line)
CHAT_PROMPT = RowFormat(
    "chat prompt",
    prompt_row,
    plain_text_suffixes=TEXT_WITH_ID.plain_text_suffixes,
    read_plain_text=TEXT_WITH_ID.read_plain_text,
)
