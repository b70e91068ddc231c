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


if __name__ == "__main__":
    here = Path(__file__).parent
    rng = random.Random(2026)
    write(here / "train.jsonl", [conversation(rng) for _ in range(1200)])
    write(here / "validation.jsonl", [conversation(rng) for _ in range(150)])
    write(here / "pairs_validation.jsonl", [pair(rng) for _ in range(150)])
