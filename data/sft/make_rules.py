"""Writes the rule-following chat data in this folder (seeded: the same files every time).

    python data/sft/make_rules.py

Each user turn names a rule and a few words; the assistant applies the rule. The rules
(reverse, sort, first, last, count) are exact, so a model's answers can be scored by exact
match, and the instruction decides the answer: a model must read it to get it right."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = [
    *("apple", "pear", "plum", "fig", "lime", "kiwi", "mango", "grape", "lemon", "peach"),
    *("cherry", "melon", "red", "blue", "green", "black", "white", "pink", "brown", "grey"),
    *("gold", "silver", "cat", "dog", "owl", "fox", "bee", "cow", "pig", "hen", "ant", "bat"),
    *("elk", "yak"),
]
NUMBERS = ["zero", "one", "two", "three", "four", "five"]
RULES = {
    "reverse": lambda words: " ".join(reversed(words)),
    "sort": lambda words: " ".join(sorted(words)),
    "first": lambda words: words[0],
    "last": lambda words: words[-1],
    "count": lambda words: NUMBERS[len(words)],
}
SYSTEM = "Apply the rule to the words and answer with the result only."


def exchange(rng: random.Random) -> tuple[str, str]:
    rule = rng.choice(list(RULES))
    words = rng.sample(WORDS, rng.randint(2, 5))
    return f"{rule}: {' '.join(words)}", RULES[rule](words)


def conversation(rng: random.Random) -> dict:
    turns = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    for _ in range(1 if rng.random() < 0.7 else 2):
        asked, answer = exchange(rng)
        turns += [{"role": "user", "content": asked}, {"role": "assistant", "content": answer}]
    return {"messages": turns}


def pair(rng: random.Random) -> dict:
    asked, answer = exchange(rng)
    return {"prompt": asked, "completion": answer}


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def asked(row: dict) -> set[str]:
    """The user turns of a row (a conversation or a pair)."""
    if "prompt" in row:
        return {row["prompt"]}
    return {turn["content"] for turn in row["messages"] if turn["role"] == "user"}


def held_out_training(rng: random.Random, count: int, held_out: set[str]) -> list[dict]:
    """`count` conversations none of whose questions is a validation question, so that
    validation scores what a model infers from the rule, not what it memorised."""
    rows: list[dict] = []
    while len(rows) < count:
        row = conversation(rng)
        if not asked(row) & held_out:
            rows.append(row)
    return rows


if __name__ == "__main__":
    here = Path(__file__).parent
    rng = random.Random(2026)
    validation = [conversation(rng) for _ in range(150)]
    pairs = [pair(rng) for _ in range(150)]
    held_out = set().union(*map(asked, validation + pairs))
    # 8,000 conversations: a 2-layer model learns all five rules from this many (1,200
    # were too few for `sort` and `reverse`: see benchmarks/sft.py)
    write(here / "train.jsonl", held_out_training(rng, 8000, held_out))
    write(here / "validation.jsonl", validation)
    write(here / "pairs_validation.jsonl", pairs)
