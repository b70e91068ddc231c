"""Turning checked rows into token ids, one function per task family.

Fine-tuning examples are tokenized one per row and padded later, per micro-batch.
MLM and CLM texts are packed: concatenated and cut into `max_length` blocks, so no block
holds padding; what does not fill the last block of a split is dropped (less than one
block per split, where the Hugging Face examples drop a remainder per 1000 texts).
"""

from __future__ import annotations

from itertools import chain

import datasets
from transformers import BatchEncoding, PreTrainedTokenizerBase

from trainer import progress
from trainer.data.read import Split
from trainer.errors import UserError

IGNORE_INDEX = -100  # label value the loss skips (padding, special tokens, sub-words)
PACK_GROUP = 1000  # texts tokenized per call


def tokenize(tokenizer: PreTrainedTokenizerBase, inputs: list, **kwargs) -> BatchEncoding:
    """`tokenizer(inputs, **kwargs)`, called on PACK_GROUP inputs at a time so that the
    progress bar of the enclosing `progress.counting` block moves as they are done (one call
    on a million texts would hold it at 0% until the end). Each group keeps the fast
    tokenizer's parallel batch; the groups' encodings are joined into one BatchEncoding, so
    `word_ids(i)` still indexes the whole input."""
    parts = []
    for start in range(0, len(inputs), PACK_GROUP):
        parts.append(tokenizer(inputs[start : start + PACK_GROUP], **kwargs))
        progress.advance(len(parts[-1]["input_ids"]))
    if len(parts) <= 1:
        return parts[0] if parts else tokenizer(inputs, **kwargs)
    data = {key: [value for part in parts for value in part[key]] for key in parts[0]}
    fast = all(part.encodings is not None for part in parts)
    encodings = [e for part in parts for e in part.encodings] if fast else None
    return BatchEncoding(data, encoding=encodings)


def encode_classification(
    split: Split, tokenizer: PreTrainedTokenizerBase, label_ids: dict[str, int], max_length: int
) -> datasets.Dataset:
    """Tokenize texts (truncated to max_length) and map labels to ids."""
    texts = [row["text"] for row in split.rows]
    encoded = tokenize(tokenizer, texts, truncation=True, max_length=max_length)
    columns = {key: list(values) for key, values in encoded.items()}
    columns["labels"] = [label_ids[row["label"]] for row in split.rows]
    return datasets.Dataset.from_dict(columns)


def encode_token_classification(
    split: Split, tokenizer: PreTrainedTokenizerBase, label_ids: dict[str, int], max_length: int
) -> datasets.Dataset:
    """Tokenize pre-split words; each word's tag goes on its first sub-token only."""
    if not tokenizer.is_fast:
        raise UserError("model.name_or_path: token-classification needs a fast tokenizer")
    encoded = tokenize(
        tokenizer,
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


def token_counts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[int]:
    """Tokens per text as `encode_classification` makes them, before truncation."""
    if not texts:
        return []
    return [len(ids) for ids in tokenize(tokenizer, texts, verbose=False)["input_ids"]]


def word_token_counts(tokenizer: PreTrainedTokenizerBase, words: list[list[str]]) -> list[int]:
    """Tokens per word list as `encode_token_classification` makes them, before truncation."""
    if not words:
        return []
    encoded = tokenize(tokenizer, words, is_split_into_words=True, verbose=False)
    return [len(ids) for ids in encoded["input_ids"]]


def document_token_counts(documents: Columns) -> list[int]:
    """Tokens per document (MLM: with its special tokens; CLM: with its EOS)."""
    return [len(ids) for ids in documents["input_ids"]]


def word_starts(word_ids: list[int | None]) -> list[bool]:
    """Which tokens begin a word (what whole-word masking selects by); special tokens never."""
    return [
        word is not None and (i == 0 or word_ids[i - 1] != word) for i, word in enumerate(word_ids)
    ]


Columns = dict[str, list[list]]  # column name -> one list per document (or per block)


def mlm_documents(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> Columns:
    """Each text with its special tokens ([CLS] ... [SEP]), and what masking must know:
    which tokens are special and which start a word (for whole-word masking)."""
    encoded = tokenize(tokenizer, texts, return_special_tokens_mask=True, verbose=False)
    word_start = (
        [word_starts(encoded.word_ids(i)) for i in range(len(texts))]
        if tokenizer.is_fast
        else [[True] * len(ids) for ids in encoded["input_ids"]]
    )
    return {
        "input_ids": encoded["input_ids"],
        "special_tokens_mask": encoded["special_tokens_mask"],
        "word_start": word_start,
    }


def clm_documents(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> Columns:
    """Each text followed by the end-of-sequence token, which separates documents."""
    if tokenizer.eos_token_id is None:
        raise UserError("model.name_or_path: the tokenizer has no EOS token to join documents")
    encoded = tokenize(tokenizer, texts, add_special_tokens=False, verbose=False)
    return {"input_ids": [[*doc, tokenizer.eos_token_id] for doc in encoded["input_ids"]]}


class Packer:
    """Concatenates documents and cuts them into blocks of `length` tokens.

    What does not fill a block is carried into the next call rather than dropped, so a
    whole corpus loses less than one block and no block holds padding. The carry is part
    of `state_dict`, which lets a stream stop and resume between any two calls."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.carry: dict[str, list] = {}

    def add(self, documents: Columns) -> Columns:
        """The full blocks that the carry plus `documents` make."""
        joined = {
            key: self.carry.get(key, []) + list(chain.from_iterable(values))
            for key, values in documents.items()
        }
        usable = len(joined["input_ids"]) // self.length * self.length
        self.carry = {key: values[usable:] for key, values in joined.items()}
        return {
            key: [values[i : i + self.length] for i in range(0, usable, self.length)]
            for key, values in joined.items()
        }

    def state_dict(self) -> dict:
        """The carried tokens (JSON-able)."""
        return {"carry": self.carry}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved carry."""
        self.carry = state["carry"]


def pack_for_mlm(
    split: Split, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """MLM blocks: texts with their special tokens, packed."""
    return _pack(split, lambda texts: mlm_documents(tokenizer, texts), max_length)


def pack_for_clm(
    split: Split, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """CLM blocks: documents joined with the end-of-sequence token, packed."""
    return _pack(split, lambda texts: clm_documents(tokenizer, texts), max_length)


def _pack(split: Split, documents, max_length: int) -> datasets.Dataset:
    packer = Packer(max_length)
    blocks: Columns = {}
    texts = [row["text"] for row in split.rows]
    for start in range(0, len(texts), PACK_GROUP):
        for key, values in packer.add(documents(texts[start : start + PACK_GROUP])).items():
            blocks.setdefault(key, []).extend(values)
    if not blocks.get("input_ids"):
        raise UserError(
            f"{split.key}: the texts hold fewer than data.max_length={max_length} tokens; "
            "lower data.max_length or add text"
        )
    return datasets.Dataset.from_dict(blocks)
