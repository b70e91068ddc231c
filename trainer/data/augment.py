"""EDA text augmentation for small classification data sets (`data.augment`).

Easy Data Augmentation (Wei & Zou, 2019) edits a sentence with one of four operations:
random deletion (each word dropped with probability p), random swap, random insertion of
a synonym of a word, and synonym replacement, the last three applied
n = max(1, round(alpha * words)) times. The synonyms come from a table the user supplies
(no WordNet download): a TSV file with `word<TAB>synonym,synonym,...` per line.

Each epoch the train set is the original rows followed by `copies` variants of every row
(example index = copy * rows + row), so the global-batch arithmetic just sees a longer
epoch. A variant is a pure function of (seed, epoch, row, copy): the same for any number of
processes and after a resume, different in each epoch. The originals come from the
encoded train set; variants are tokenized when the loader asks for them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from trainer.config import AugmentConfig, RunConfig
from trainer.data.collate import example_seed
from trainer.data.prepare import read_splits
from trainer.data.sampling import KeyedDataset
from trainer.errors import UserError
from trainer.text_files import read_text

Synonyms = dict[str, list[str]]
Operation = Callable[[list[str], float, Synonyms, random.Random], list[str]]
_PUNCTUATION = re.compile(r"^(\W*)(.*?)(\W*)$")


def read_synonyms(path: str) -> Synonyms:
    """The synonym table: `word<TAB>syn1,syn2` per line (a synonym may be several words),
    blank lines and `#` comments skipped; words match case-insensitively."""
    table: Synonyms = {}
    source = Path(path).expanduser()
    text = read_text(source, f"data.augment.synonyms: {source.name}")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        word, sep, rest = line.partition("\t")
        synonyms = [s.strip() for s in rest.split(",") if s.strip()]
        if not sep or not word.strip() or not synonyms:
            raise UserError(
                f"data.augment.synonyms: {source.name} line {number}: "
                "expected 'word<TAB>synonym,synonym'"
            )
        table.setdefault(word.strip().lower(), []).extend(synonyms)
    if not table:
        raise UserError(f"data.augment.synonyms: {source.name} holds no synonyms")
    return table


def _parts(word: str) -> tuple[str, str, str]:
    """Leading punctuation, the word, trailing punctuation: `"bland."` -> ("", "bland", ".")."""
    match = _PUNCTUATION.match(word)
    return match.group(1), match.group(2), match.group(3)


def _has_synonyms(word: str, synonyms: Synonyms) -> bool:
    return _parts(word)[1].lower() in synonyms


def _count(alpha: float, words: int) -> int:
    return max(1, round(alpha * words))


# --- the four operations: (words, strength, synonyms, rng) -> new words --------------------


def random_deletion(words: list[str], p: float, _: Synonyms, rng: random.Random) -> list[str]:
    """Drop each word with probability p; never leaves the text empty."""
    kept = [word for word in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def random_swap(words: list[str], alpha: float, _: Synonyms, rng: random.Random) -> list[str]:
    """Swap two random words, n times: the same words in another order."""
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(_count(alpha, len(words))):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def random_insertion(
    words: list[str], alpha: float, synonyms: Synonyms, rng: random.Random
) -> list[str]:
    """Insert a synonym of a random word (one that has some) at a random place, n times."""
    words = list(words)
    for _ in range(_count(alpha, len(words))):
        candidates = [word for word in words if _has_synonyms(word, synonyms)]
        if not candidates:
            break
        synonym = rng.choice(synonyms[_parts(rng.choice(candidates))[1].lower()])
        words.insert(rng.randint(0, len(words)), synonym)
    return words


def synonym_replacement(
    words: list[str], alpha: float, synonyms: Synonyms, rng: random.Random
) -> list[str]:
    """Replace up to n distinct words that have synonyms, keeping punctuation and an
    initial capital."""
    words = list(words)
    positions = [i for i, word in enumerate(words) if _has_synonyms(word, synonyms)]
    rng.shuffle(positions)
    for i in positions[: _count(alpha, len(words))]:
        lead, core, trail = _parts(words[i])
        synonym = rng.choice(synonyms[core.lower()])
        if core[:1].isupper():
            synonym = synonym[:1].upper() + synonym[1:]
        words[i] = lead + synonym + trail
    return words


OPERATIONS: dict[str, Operation] = {
    "deletion": random_deletion,
    "swap": random_swap,
    "insertion": random_insertion,
    "synonym_replacement": synonym_replacement,
}


def augment_text(
    text: str,
    settings: AugmentConfig,
    synonyms: Synonyms,
    seed: int,
    epoch: int,
    row: int,
    copy: int,
) -> str:
    """Variant `copy` of a row's text in `epoch`: one operation, chosen among those with a
    strength above 0, applied with a generator seeded by (seed, epoch, row, copy) alone."""
    rng = random.Random(f"{seed}/{epoch}/{row}/{copy}")  # str seeds hash the same everywhere
    enabled = [name for name in OPERATIONS if getattr(settings, name) > 0]
    name = rng.choice(enabled)
    return " ".join(OPERATIONS[name](text.split(), getattr(settings, name), synonyms, rng))


class AugmentedDataset(KeyedDataset):
    """The encoded train rows, then `copies` augmented variants of each, by (epoch, index)."""

    def __init__(
        self,
        encoded: datasets.Dataset,
        texts: list[str],
        tokenizer: PreTrainedTokenizerBase,
        cfg: RunConfig,
    ) -> None:
        super().__init__(encoded, cfg.train.seed)
        self.texts = texts
        self.tokenizer = tokenizer
        self.max_length = cfg.data.max_length
        self.settings = cfg.data.augment
        self.synonyms = read_synonyms(self.settings.synonyms) if self.settings.synonyms else {}

    def __len__(self) -> int:
        return len(self.texts) * (1 + self.settings.copies)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        copy, row = divmod(index, len(self.texts))
        if copy == 0:
            return super().__getitem__((epoch, row))
        text = augment_text(
            self.texts[row], self.settings, self.synonyms, self.run_seed, epoch, row, copy
        )
        encoded = self.tokenizer(text, truncation=True, max_length=self.max_length)
        return {
            **encoded,
            "labels": self.examples[row]["labels"],
            "seed": example_seed(self.run_seed, epoch, index),
        }


def training_examples(
    encoded: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: RunConfig
) -> KeyedDataset:
    """What the loop indexes by (epoch, index): the encoded train set, with augmented
    variants appended when `data.augment.copies` > 0. Variants are made from the texts,
    which the tokenization cache does not keep: augmenting reads the (small) train rows."""
    if not cfg.data.augment.copies:
        return KeyedDataset(encoded, cfg.train.seed)
    trains, _, _ = read_splits(cfg)
    texts = [row["text"] for row in trains[0].rows]
    return AugmentedDataset(encoded, texts, tokenizer, cfg)
