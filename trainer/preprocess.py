"""Turning checked rows into token ids, one function per task family.

Fine-tuning examples are tokenized one per row and padded later, per micro-batch.
MLM and CLM texts are packed: concatenated and cut into `max_length` blocks, so no
block holds padding (the remainder of each group of texts is dropped, as in the
Hugging Face language-modeling examples).
"""

from __future__ import annotations

from itertools import chain

import datasets
from transformers import PreTrainedTokenizerBase

from trainer.data import Split
from trainer.errors import UserError

IGNORE_INDEX = -100  # label value the loss skips (padding, special tokens, sub-words)
PACK_GROUP = 1000  # texts concatenated together before cutting blocks


def encode_classification(
    split: Split, tokenizer: PreTrainedTokenizerBase, label_ids: dict[str, int], max_length: int
) -> datasets.Dataset:
    """Tokenize texts (truncated to max_length) and map labels to ids."""
    encoded = tokenizer([row["text"] for row in split.rows], truncation=True, max_length=max_length)
    columns = {key: list(values) for key, values in encoded.items()}
    columns["labels"] = [label_ids[row["label"]] for row in split.rows]
    return datasets.Dataset.from_dict(columns)


def encode_token_classification(
    split: Split, tokenizer: PreTrainedTokenizerBase, label_ids: dict[str, int], max_length: int
) -> datasets.Dataset:
    """Tokenize pre-split words; each word's tag goes on its first sub-token only."""
    if not tokenizer.is_fast:
        raise UserError("model.name_or_path: token-classification needs a fast tokenizer")
    encoded = tokenizer(
        [row["tokens"] for row in split.rows],
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
    )
    labels = []
    for index, row in enumerate(split.rows):
        previous = None
        aligned = []
        for word in encoded.word_ids(index):
            first_piece = word is not None and word != previous
            aligned.append(label_ids[row["tags"][word]] if first_piece else IGNORE_INDEX)
            previous = word
        labels.append(aligned)
    columns = {key: list(values) for key, values in encoded.items()}
    columns["labels"] = labels
    return datasets.Dataset.from_dict(columns)


def word_starts(word_ids: list[int | None]) -> list[bool]:
    """Which tokens begin a word (what whole-word masking selects by); special tokens never."""
    return [
        word is not None and (i == 0 or word_ids[i - 1] != word) for i, word in enumerate(word_ids)
    ]


def pack_for_mlm(
    split: Split, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Texts with their special tokens, packed into blocks; keeps what masking must know."""

    def tokenize_and_pack(batch: dict) -> dict:
        encoded = tokenizer(batch["text"], return_special_tokens_mask=True, verbose=False)
        columns = {
            "input_ids": encoded["input_ids"],
            "special_tokens_mask": encoded["special_tokens_mask"],
            "word_start": [word_starts(encoded.word_ids(i)) for i in range(len(batch["text"]))]
            if tokenizer.is_fast
            else [[True] * len(ids) for ids in encoded["input_ids"]],
        }
        return _cut_blocks(columns, max_length)

    return _pack(split, tokenize_and_pack, max_length)


def pack_for_clm(
    split: Split, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Documents joined with the end-of-sequence token, packed into blocks."""
    if tokenizer.eos_token_id is None:
        raise UserError("model.name_or_path: the tokenizer has no EOS token to join documents")

    def tokenize_and_pack(batch: dict) -> dict:
        encoded = tokenizer(batch["text"], add_special_tokens=False, verbose=False)
        ids = [[*doc, tokenizer.eos_token_id] for doc in encoded["input_ids"]]
        return _cut_blocks({"input_ids": ids}, max_length)

    return _pack(split, tokenize_and_pack, max_length)


def _cut_blocks(columns: dict[str, list[list]], length: int) -> dict[str, list[list]]:
    """Concatenate each column and cut it into full blocks of `length`, dropping the rest."""
    joined = {key: list(chain.from_iterable(values)) for key, values in columns.items()}
    usable = len(joined["input_ids"]) // length * length
    return {
        key: [values[i : i + length] for i in range(0, usable, length)]
        for key, values in joined.items()
    }


def _pack(split: Split, tokenize_and_pack, max_length: int) -> datasets.Dataset:
    texts = datasets.Dataset.from_dict({"text": [row["text"] for row in split.rows]})
    packed = texts.map(
        tokenize_and_pack, batched=True, batch_size=PACK_GROUP, remove_columns=["text"]
    )
    if len(packed) == 0:
        raise UserError(
            f"{split.key}: the texts hold fewer than data.max_length={max_length} tokens; "
            "lower data.max_length or add text"
        )
    return packed
