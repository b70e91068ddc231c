"""Preference pairs to token ids and answer-only labels, chosen and rejected sharing the
prompt.

Each answer is tokenized as supervised fine-tuning tokenizes a prompt and its completion
(data/chat_encode.py: the completion after the tokenized prompt, EOS a target; messages
through the chat template, its assistant tokens); only the answer's own tokens are
targets, never an assistant turn of the prompt.

A pair longer than `data.max_length` (its longer side) loses the same number of leading
tokens on both sides (`data.truncation: keep_end`), so the two still share one prompt,
or is dropped (`drop`). A pair whose answers alone do not fit is an error naming the row:
cut that far it would compare two answers to no prompt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import datasets

from trainer.data.chat_encode import Tokens, common_prefix, row_tokens
from trainer.data.encode import IGNORE_INDEX
from trainer.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from trainer.config import DataConfig
    from trainer.data.read import Split


def answer_tokens(tokenizer: PreTrainedTokenizerBase, prompt, answer) -> Tokens:
    """The prompt followed by one answer, its targets the answer's tokens only."""
    if isinstance(answer, str):
        return row_tokens(tokenizer, {"prompt": prompt, "completion": answer})
    tokens = row_tokens(tokenizer, {"messages": prompt + answer})
    asked = tokenizer.apply_chat_template(
        prompt, tokenize=True, return_dict=True, add_generation_prompt=True
    )["input_ids"]
    start = common_prefix(asked, tokens.ids)
    tokens.trained = [on and i >= start for i, on in enumerate(tokens.trained)]
    return tokens


def pair_tokens(tokenizer: PreTrainedTokenizerBase, row: dict) -> tuple[Tokens, Tokens]:
    """The chosen and the rejected sequence of one pair, before truncation."""
    chosen = answer_tokens(tokenizer, row["prompt"], row["chosen"])
    return chosen, answer_tokens(tokenizer, row["prompt"], row["rejected"])


def _cut(tokens: Tokens, count: int) -> Tokens:
    return Tokens(tokens.ids[count:], tokens.trained[count:])


def _labels(tokens: Tokens) -> list[int]:
    return [i if on else IGNORE_INDEX for i, on in zip(tokens.ids, tokens.trained, strict=True)]


def encode_pairs(
    split: Split, tokenizer: PreTrainedTokenizerBase, data: DataConfig
) -> datasets.Dataset:
    """Per pair: the chosen sequence as input_ids/labels, the rejected one as
    rejected_input_ids/rejected_labels (the chosen side is what length-based batching and
    token counts read)."""
    names = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")
    columns: dict[str, list] = {name: [] for name in names}
    for row, where in zip(split.rows, split.where, strict=True):
        chosen, rejected = pair_tokens(tokenizer, row)
        for side in (chosen, rejected):
            if not any(side.trained):
                raise UserError(f"{split.key}: {where}: no answer token to train on")
        excess = max(len(chosen.ids), len(rejected.ids)) - data.max_length
        if excess > 0:
            if data.truncation == "drop":
                continue
            prompt = min(side.trained.index(True) for side in (chosen, rejected))
            if excess >= prompt:
                raise UserError(
                    f"{split.key}: {where}: the answers alone are longer than "
                    f"data.max_length={data.max_length}; cut to fit, the pair has no prompt "
                    "(raise data.max_length or shorten the answers)"
                )
            chosen, rejected = _cut(chosen, excess), _cut(rejected, excess)
        columns["input_ids"].append(chosen.ids)
        columns["labels"].append(_labels(chosen))
        columns["rejected_input_ids"].append(rejected.ids)
        columns["rejected_labels"].append(_labels(rejected))
    if not columns["input_ids"]:
        raise UserError(
            f"{split.key}: every pair is longer than data.max_length={data.max_length} and "
            "data.truncation=drop drops them all"
        )
    return datasets.Dataset.from_dict(columns)


def pair_token_counts(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[int]:
    """Tokens per pair as data.max_length sees them: its longer side, before truncation."""
    return [max(len(side.ids) for side in pair_tokens(tokenizer, row)) for row in rows]
