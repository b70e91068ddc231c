"""NER tag schemes, and the one decoder from word tags to entities.

Evaluation (tasks/metrics.py) and `trainer predict` (tasks/heads.py) both read entities
here, so the entities a prediction shows are the ones evaluation counts. Each scheme is
read strictly, as seqeval's `mode="strict"` reads it (tests/test_tag_schemes.py checks
equality on every short sequence): a fragment the scheme does not allow (an I-PER after O
in IOB2, a B-PER without its E-PER in BIOES) is no entity. A lenient reading, which
guesses an entity from such fragments, would make IOB1 and IOB2 the same scheme.

- io: `PER` or `I-PER` on every word; consecutive words of one type are one entity.
- iob1: I-X inside; B-X only where an X entity starts right after another X entity.
- iob2 (bio): B-X starts every entity, I-X continues it.
- bioes (iobes): S-X is a one-word entity; B-X, I-X..., E-X a longer one.

Plain Python (no torch): config validation and the data reader use it before torch loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from trainer.errors import UserError

OUTSIDE = "O"
PREFIXES = ("B", "I", "E", "S")
ALIASES = {"bio": "iob2", "iobes": "bioes"}
SCHEMES = ("io", "iob1", "iob2", "bio", "bioes", "iobes")  # the values of data.tag_scheme

Tag = tuple[str, str]  # (prefix, type): ('B', 'PER'); ('O', '') outside; io tags read as 'I'


def written_prefix(tag: str) -> str:
    """The prefix as written: 'B' for B-PER, '' for PER (IO) and for O."""
    return tag[0] if tag[:1] in PREFIXES and tag[1:2] == "-" and len(tag) > 2 else ""


def split_tag(tag: str) -> Tag:
    """('B', 'PER') for B-PER; an unprefixed tag (IO scheme) is inside its type."""
    if tag == OUTSIDE:
        return OUTSIDE, ""
    prefix = written_prefix(tag)
    return (prefix, tag[2:]) if prefix else ("I", tag)


def entity_type(tag: str) -> str:
    """The entity type a tag belongs to ('' for O)."""
    return split_tag(tag)[1]


@dataclass(frozen=True)
class Rules:
    """When an entity starts, continues and is complete, read between neighbouring tags."""

    prefixes: frozenset[str]  # the written prefixes its tags may have ('': none, as in io)
    starts: Callable[[Tag, Tag], bool]  # (previous, current)
    continues: Callable[[Tag, Tag], bool]  # (last word so far, next word)
    completes: Callable[[Tag, Tag], bool]  # (last word, the word after it, O at the end)


def _iob1_starts(prev: Tag, cur: Tag) -> bool:
    if cur[0] == "I":  # after O, another type, or any B-
        return prev[1] != cur[1] or prev[0] == "B"
    return cur[0] == "B" and prev[0] in "IB" and prev[1] == cur[1]


def _inside(prefixes: str) -> Callable[[Tag, Tag], bool]:
    """`next` continues the entity: same type, one of `prefixes`, after a B- or I-."""
    return lambda last, nxt: nxt[0] in prefixes and last[0] in "BI" and last[1] == nxt[1]


RULES = {
    "io": Rules(
        frozenset({"", "I"}),
        starts=lambda prev, cur: cur[0] == "I" and prev[1] != cur[1],
        continues=lambda last, nxt: nxt[0] == "I" and nxt[1] == last[1],
        completes=lambda last, nxt: True,
    ),
    "iob1": Rules(
        frozenset("BI"),
        starts=_iob1_starts,
        continues=_inside("I"),
        # a lone B-X is no entity when a B- of another type follows (as seqeval reads it)
        completes=lambda last, nxt: not (last[0] == nxt[0] == "B" and last[1] != nxt[1]),
    ),
    "iob2": Rules(
        frozenset("BI"),
        starts=lambda prev, cur: cur[0] == "B",
        continues=_inside("I"),
        completes=lambda last, nxt: True,
    ),
    "bioes": Rules(
        frozenset("BIES"),
        starts=lambda prev, cur: cur[0] in "BS",
        continues=_inside("IE"),
        completes=lambda last, nxt: last[0] in "SE",
    ),
}


def canonical(scheme: str) -> str:
    """The scheme an alias names (bio -> iob2, iobes -> bioes)."""
    return ALIASES.get(scheme, scheme)


def decode(tags: list[str], scheme: str) -> list[tuple[str, int, int]]:
    """Entities as (type, first word, one past the last word), in order."""
    rules = RULES[canonical(scheme)]
    parsed = [split_tag(tag) for tag in tags] + [(OUTSIDE, "")]
    entities, i = [], 0
    while i < len(tags):
        previous = parsed[i - 1] if i else (OUTSIDE, "")
        if not rules.starts(previous, parsed[i]):
            i += 1
            continue
        end = i + 1
        while rules.continues(parsed[end - 1], parsed[end]):
            end += 1
        if rules.completes(parsed[end - 1], parsed[end]):
            entities.append((parsed[i][1], i, end))
        i = end
    return entities


def detect(label_names: list[str]) -> str:
    """The scheme label names are written in: bioes with E- or S- tags, iob2 with B- tags,
    else io (I- tags alone read the same in io and iob1)."""
    prefixes = {written_prefix(name) for name in label_names if name != OUTSIDE}
    if prefixes & {"E", "S"}:
        return "bioes"
    return "iob2" if "B" in prefixes else "io"


def resolve(configured: str | None, label_names: list[str]) -> str:
    """`data.tag_scheme`, or the one detected from the label names when unset; a label the
    scheme can't have is a UserError naming it, before any training."""
    scheme = canonical(configured) if configured else detect(label_names)
    allowed = RULES[scheme].prefixes
    for name in label_names:
        if name != OUTSIDE and written_prefix(name) not in allowed:
            how = "set" if configured else "detected from the labels"
            raise UserError(
                f"data.tag_scheme: {scheme} ({how}) has no tag like '{name}'; "
                f"set data.tag_scheme to one of {', '.join(SCHEMES)}"
            )
    return scheme
