"""Sentence-pair examples for next-sentence prediction (NSP), as in BERT's pretraining.

Documents are the rows of the split (a `.txt` file: one document per line). A document is
cut into sentences by a simple rule: a sentence ends at `.`, `!` or `?` followed by
whitespace and then an upper-case letter or a digit (possibly after an opening quote or
bracket). Abbreviations followed by a capital ("Dr. Smith") are cut too; that costs a few
odd pairs, not correctness.

Each sentence that has a successor in its document starts one pair. With probability 1/2
the second segment is that successor (label 0, "is next"); otherwise it is a random
sentence of a random *other* document (label 1, "not next"), so a pair never joins a
sentence with itself, nor with its true successor under the label "not next". The draw is
seeded by the run seed and made once, when the split is encoded; MLM masks are still drawn
per example and epoch by the collator.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import datasets
from transformers import PreTrainedTokenizerBase

from trainer import progress
from trainer.data.encode import word_starts
from trainer.data.read import Split
from trainer.errors import UserError

SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
IS_NEXT, NOT_NEXT = 0, 1  # the label convention of BertForPreTraining's next_sentence_label

Position = tuple[int, int]  # (document, sentence)


def split_sentences(text: str) -> list[str]:
    """The sentences of one document, by the rule in the module docstring."""
    return [part.strip() for part in SENTENCE_END.split(text.strip()) if part.strip()]


@dataclass(frozen=True)
class SentencePair:
    """Two sentences by position, and whether the second was drawn at random."""

    first: Position
    second: Position
    is_random: bool


def draw_pairs(documents: list[list[str]], seed: int) -> list[SentencePair]:
    """One pair per sentence that has a successor: the successor or, half of the time, a
    random sentence of another document (see the module docstring)."""
    rng = random.Random(seed)
    pairs = []
    for doc, sentences in enumerate(documents):
        for index in range(len(sentences) - 1):
            if rng.random() < 0.5:
                pairs.append(SentencePair((doc, index), (doc, index + 1), False))
                continue
            other = rng.randrange(len(documents) - 1)
            other += other >= doc  # any document but this one
            second = (other, rng.randrange(len(documents[other])))
            pairs.append(SentencePair((doc, index), second, True))
    return pairs


def _documents(split: Split) -> list[list[str]]:
    documents = [split_sentences(row["text"]) for row in split.rows]
    if len(documents) < 2:
        raise UserError(f"{split.key}: next-sentence pairs need at least two documents")
    if all(len(sentences) < 2 for sentences in documents):
        raise UserError(
            f"{split.key}: no document holds two sentences, so there is no next sentence "
            "to predict (one document per line, sentences ending in . ! or ?)"
        )
    return documents


def encode_sentence_pairs(
    split: Split, tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int
) -> datasets.Dataset:
    """Tokenized pairs `[CLS] A [SEP] B [SEP]` (the longer segment truncated first to
    max_length), with what MLM masking needs and the NSP label."""
    if tokenizer.sep_token is None:
        raise UserError("model.tokenizer: next-sentence pairs need a tokenizer with [SEP]")
    documents = _documents(split)
    pairs = draw_pairs(documents, seed)
    encoded = tokenizer(
        [documents[d][s] for d, s in (pair.first for pair in pairs)],
        [documents[d][s] for d, s in (pair.second for pair in pairs)],
        truncation="longest_first",
        max_length=max_length,
        return_special_tokens_mask=True,
        return_token_type_ids=True,
    )
    columns = {key: list(encoded[key]) for key in ("input_ids", "token_type_ids")}
    columns["special_tokens_mask"] = list(encoded["special_tokens_mask"])
    columns["word_start"] = [
        word_starts(encoded.word_ids(i)) if tokenizer.is_fast else [True] * len(ids)
        for i, ids in enumerate(encoded["input_ids"])
    ]
    columns["next_sentence_label"] = [NOT_NEXT if p.is_random else IS_NEXT for p in pairs]
    progress.advance(len(split))  # the bar counts rows; one call tokenized their pairs
    return datasets.Dataset.from_dict(columns)
