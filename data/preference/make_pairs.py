"""Writes the preference pairs in this folder (seeded: the same files every time).

    python data/preference/make_pairs.py

Each prompt names a rule and a few words (the rules of data/sft/make_rules.py). The chosen
answer applies the named rule and is the result only, as data/sft's system turn asks. The
rejected one, in half the pairs, applies another rule to the same words, so that only the
rule named tells the answers apart: a model must read the instruction to prefer the right
one. In the other half it is the right result after a pleasantry (`PLEASANTRY`) that the
instruction rules out. Half the rows are plain text, half chat messages (a user turn, the
answers as assistant turns).

`with_pleasantries` makes the supervised data that preference tuning is for: the same
demonstrations, half of whose answers start with the pleasantry, as when two annotators
wrote them and one did not follow the instruction (benchmarks/preference_rule.py)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sft"))
from make_rules import RULES, WORDS, asked  # the sft rules, one definition

PLEASANTRY = "Sure! The answer is: "


def preference_pair(rng: random.Random) -> dict:
    """One prompt with the right rule's answer, and either another rule's (a different
    answer) or the right one after the pleasantry."""
    while True:
        rule, other = rng.sample(list(RULES), 2)
        words = rng.sample(WORDS, rng.randint(2, 5))
        chosen, rejected = RULES[rule](words), RULES[other](words)
        if chosen != rejected:
            break
    if rng.random() < 0.5:
        rejected = PLEASANTRY + chosen
    prompt = f"{rule}: {' '.join(words)}"
    if rng.random() < 0.5:
        return {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def with_pleasantries(rows: list[dict], rng: random.Random) -> list[dict]:
    """Conversations (data/sft's) with each assistant answer, by a coin toss, after the
    pleasantry."""
    changed = []
    for row in rows:
        turns = [
            {**t, "content": PLEASANTRY + t["content"]}
            if t["role"] == "assistant" and rng.random() < 0.5
            else t
            for t in row["messages"]
        ]
        changed.append({"messages": turns})
    return changed


def write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def question(row: dict) -> str:
    """A pair's prompt as text (its user turn for chat rows)."""
    prompt = row["prompt"]
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def pairs(rng: random.Random, count: int, held_out: set[str]) -> list[dict]:
    """`count` pairs whose prompts are not in `held_out`."""
    rows: list[dict] = []
    while len(rows) < count:
        row = preference_pair(rng)
        if question(row) not in held_out:
            rows.append(row)
    return rows


if __name__ == "__main__":
    here = Path(__file__).parent
    rng = random.Random(2026)
    # the held-out pairs ask nothing data/sft/train.jsonl asks, so that SFT then DPO
    # (benchmarks/preference_rule.py) is scored on questions neither trained on
    sft_rows = (here.parent / "sft" / "train.jsonl").read_text().splitlines()
    asked_in_sft = set().union(*(asked(json.loads(line)) for line in sft_rows))
    validation = pairs(rng, 200, asked_in_sft)
    write(here / "train.jsonl", pairs(rng, 1000, {question(row) for row in validation}))
    write(here / "validation.jsonl", validation)
