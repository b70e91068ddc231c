"""Vocabulary extension: add frequent domain words that a tokenizer fragments, and start
their embeddings where the model already was.

Which words: the corpus is normalised as the tokenizer normalises it (lower-cased for an
uncased BERT) and cut into runs of letters of at least `MIN_WORD_LENGTH`; a word is a
candidate when the base tokenizer splits it into two or more pieces and it occurs at least
`min_frequency` times. Candidates are ranked by `frequency x (pieces - 1)`, the number of
tokens the corpus would shrink by if the word were one token, ties broken alphabetically.
The chosen words are added as whole-word tokens (`AddedToken(single_word=True)`), so
"statin" does not split "nystatin".

The tokenizer folder gets `vocabulary_extension.json`, recording each added token with the
base ids of the pieces it replaces. When a run loads such a tokenizer for a model whose
embedding matrix is smaller, each new row (input embedding, and the untied output
embedding and output bias of an MLM head) is set to the mean of the rows of its pieces,
not drawn at random: the model reads the new token at first roughly as it read the pieces.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase

from trainer import progress

EXTENSION_FILE = "vocabulary_extension.json"
MIN_WORD_LENGTH = 3
WORD = re.compile(rf"[^\W\d_]{{{MIN_WORD_LENGTH},}}")  # letters only: no digits, no "_"
RULE = "frequency x (pieces - 1): the tokens the corpus saves when the word is one token"


@dataclass
class AddedWord:
    """One word to add, how often the corpus has it, and the base pieces it replaces."""

    token: str
    frequency: int
    pieces: list[str]
    piece_ids: list[int]
    id: int = -1  # its id in the extended tokenizer, once added

    @property
    def tokens_saved(self) -> int:
        """How many tokens fewer the corpus takes once the word is one token."""
        return self.frequency * (len(self.piece_ids) - 1)


def count_words(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> Counter:
    """Word frequencies in the tokenizer's normalised form of the texts."""
    normalizer = tokenizer.backend_tokenizer.normalizer
    counts: Counter = Counter()
    for text in progress.bar(texts, desc="count words", unit="texts"):
        counts.update(WORD.findall(normalizer.normalize_str(text) if normalizer else text))
    return counts


def choose_words(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], count: int, min_frequency: int = 2
) -> list[AddedWord]:
    """The `count` words that save the most tokens (see the module docstring)."""
    candidates = []
    counts = count_words(tokenizer, texts)
    for word, frequency in progress.bar(counts.items(), desc="split words", unit="words"):
        if frequency < min_frequency:
            continue
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) >= 2:
            pieces = tokenizer.convert_ids_to_tokens(ids)
            candidates.append(AddedWord(word, frequency, pieces, ids))
    candidates.sort(key=lambda w: (-w.tokens_saved, w.token))
    return candidates[:count]


def extend(tokenizer: PreTrainedTokenizerBase, words: list[AddedWord]) -> None:
    """Add the words to the tokenizer as whole-word tokens and record their new ids."""
    tokenizer.add_tokens([AddedToken(w.token, single_word=True, normalized=True) for w in words])
    for word in words:
        word.id = tokenizer.convert_tokens_to_ids(word.token)


def save_record(folder: Path, base: str, base_size: int, words: list[AddedWord]) -> None:
    """Write `vocabulary_extension.json` next to the saved tokenizer."""
    record = {
        "base_tokenizer": base,
        "base_size": base_size,
        "rule": RULE,
        "tokens": [{**asdict(w), "tokens_saved": w.tokens_saved} for w in words],
    }
    (folder / EXTENSION_FILE).write_text(json.dumps(record, indent=1, ensure_ascii=False))


def added_token_pieces(tokenizer_folder: str) -> dict[int, list[int]]:
    """New token id -> base piece ids, from a folder written by `trainer tokenizer extend`
    (empty for any other tokenizer)."""
    path = Path(tokenizer_folder).expanduser() / EXTENSION_FILE
    if not path.is_file():
        return {}
    return {t["id"]: t["piece_ids"] for t in json.loads(path.read_text())["tokens"]}


@torch.no_grad()
def grow_embeddings(model, size: int, pieces: dict[int, list[int]]) -> None:
    """Resize the embeddings to `size` rows; each new row that has pieces becomes their mean
    (input embedding, untied output embedding, output bias)."""
    old_size = model.get_input_embeddings().num_embeddings
    model.resize_token_embeddings(size, mean_resizing=False)
    new = {i: ids for i, ids in pieces.items() if old_size <= i < size}
    inputs = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    matrices = [inputs]
    if output is not None and output.weight is not inputs:
        matrices.append(output.weight)
    bias = getattr(output, "bias", None) if output is not None else None
    for token_id, piece_ids in new.items():
        for matrix in matrices:
            matrix[token_id] = matrix[piece_ids].mean(dim=0)
        if bias is not None:
            bias[token_id] = bias[piece_ids].mean()
