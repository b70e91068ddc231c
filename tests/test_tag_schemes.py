"""trainer.tasks.tag_schemes: one decoder, equal to seqeval's strict reading of each scheme."""

from __future__ import annotations

import itertools

import pytest
import torch
from seqeval.metrics import f1_score as seq_f1
from seqeval.scheme import IOB1, IOB2, IOBES, Entities

from trainer.cli import main
from trainer.config import DataConfig
from trainer.data.encode import IGNORE_INDEX
from trainer.errors import UserError
from trainer.inference import WordTag, merge_entities
from trainer.tasks.tag_schemes import decode, detect, entity_type, resolve
from trainer.tasks.token_classification import TOKEN_CLASSIFICATION

TYPES = ("PER", "LOC")


def every_sequence(prefixes: str, longest: int):
    """Every tag sequence up to `longest` words over O and `prefixes` x two types: the
    valid ones and the ill-formed ones a model can predict."""
    alphabet = ["O"] + [f"{p}-{t}" for p in prefixes for t in TYPES]
    for length in range(1, longest + 1):
        yield from (list(tags) for tags in itertools.product(alphabet, repeat=length))


@pytest.mark.parametrize(
    ("scheme", "reference", "prefixes", "longest"),
    [("iob1", IOB1, "BI", 5), ("iob2", IOB2, "BI", 5), ("bioes", IOBES, "BIES", 4)],
)
def test_decode_equals_seqeval_strict_on_every_short_sequence(scheme, reference, prefixes, longest):
    sequences = list(every_sequence(prefixes, longest))
    expected = Entities(sequences, reference).entities
    for tags, theirs in zip(sequences, expected, strict=True):
        ours = decode(tags, scheme)
        assert ours == [(e.tag, e.start, e.end) for e in theirs], tags
    assert len(sequences) > 3000


def test_the_schemes_read_one_sequence_differently():
    assert decode(["B-PER", "E-PER"], "bioes") == [("PER", 0, 2)]  # one entity, not two
    assert decode(["B-PER", "I-PER", "O"], "bioes") == []  # no E-PER: incomplete
    assert decode(["O", "I-PER", "I-PER"], "iob2") == []  # no B-PER: no entity
    assert decode(["O", "I-PER", "I-PER"], "iob1") == [("PER", 1, 3)]
    assert decode(["I-PER", "B-PER"], "iob1") == [("PER", 0, 1), ("PER", 1, 2)]
    assert decode(["I-PER", "B-PER"], "iob2") == [("PER", 1, 2)]
    assert decode(["PER", "PER", "O", "LOC", "PER"], "io") == [
        ("PER", 0, 2),
        ("LOC", 3, 4),
        ("PER", 4, 5),
    ]
    assert decode(["I-PER", "I-PER", "I-LOC"], "io") == [("PER", 0, 2), ("LOC", 2, 3)]
    assert decode(["B-PER", "I-PER"], "bio") == decode(["B-PER", "I-PER"], "iob2")


def test_the_scheme_is_detected_from_the_label_names():
    assert detect(["O", "B-PER", "I-PER"]) == "iob2"
    assert detect(["O", "B-PER", "I-PER", "E-PER", "S-PER"]) == "bioes"
    assert detect(["O", "S-PER", "B-LOC", "E-LOC"]) == "bioes"
    assert detect(["O", "PER", "LOC"]) == "io"
    assert detect(["O", "I-PER", "I-LOC"]) == "io"
    assert resolve("bio", ["O", "B-PER", "I-PER"]) == "iob2"
    assert resolve("iobes", ["O", "B-PER", "E-PER"]) == "bioes"
    assert resolve("iob1", ["O", "I-PER", "B-PER"]) == "iob1"


def test_a_label_the_scheme_cannot_have_is_a_user_error():
    with pytest.raises(UserError, match=r"data.tag_scheme: iob2 \(set\) has no tag like 'E-PER'"):
        resolve("iob2", ["O", "B-PER", "E-PER"])
    with pytest.raises(UserError, match=r"iob2 \(detected from the labels\).*'LOC'"):
        resolve(None, ["O", "B-PER", "LOC"])
    with pytest.raises(UserError, match=r"io \(set\) has no tag like 'B-PER'"):
        resolve("io", ["O", "B-PER", "I-PER"])


# --- predict and evaluation read one sequence alike, in every scheme -----------------------

CASES = {  # scheme: (gold, predicted), the predictions right, wrong and ill-formed
    "io": (
        [["PER", "PER", "O", "LOC"], ["LOC", "PER", "O", "O", "PER"]],
        [["PER", "O", "O", "LOC"], ["LOC", "LOC", "O", "PER", "PER"]],
    ),
    "iob1": (
        [["I-PER", "B-PER", "O", "I-LOC"], ["O", "I-LOC", "I-LOC", "I-PER", "O"]],
        [["I-PER", "I-PER", "O", "I-LOC"], ["B-LOC", "I-LOC", "B-PER", "I-PER", "B-LOC"]],
    ),
    "iob2": (
        [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC", "B-LOC", "I-LOC", "B-PER"]],
        [["B-PER", "I-PER", "O", "I-LOC"], ["O", "B-LOC", "I-LOC", "I-LOC", "B-LOC"]],
    ),
    "bioes": (
        [["B-PER", "E-PER", "O", "S-LOC"], ["B-LOC", "I-LOC", "E-LOC", "O", "S-PER"]],
        [["B-PER", "E-PER", "E-PER", "S-LOC"], ["B-LOC", "I-LOC", "O", "B-PER", "E-PER"]],
    ),
}
SEQEVAL = {"iob1": IOB1, "iob2": IOB2, "bioes": IOBES}  # seqeval has no IO scheme


def names_of(*sequences: list[list[str]]) -> list[str]:
    """Label names in the order the reader gives them ('O' first, then by type)."""
    tags = {tag for rows in sequences for row in rows for tag in row}
    return ["O", *sorted(tags - {"O"}, key=lambda tag: (entity_type(tag), tag))]


def predicted_entities(tags: list[str], scheme: str) -> set[tuple[str, int, int]]:
    """What `trainer predict` shows for words tagged `tags`, as (type, first, stop) words."""
    words = [WordTag(tag, 1.0, 3 * i, 3 * i + 2) for i, tag in enumerate(tags)]
    text = " ".join(f"w{i}" for i in range(len(tags)))
    entities = merge_entities(words, text, scheme)
    return {(e["type"], e["start"] // 3, e["end"] // 3 + 1) for e in entities}


def evaluation_batch(gold, predicted, names):
    """Logits and labels as evaluation sees them: first sub-tokens labelled, the rest -100."""
    ids = {name: i for i, name in enumerate(names)}
    labels = torch.full((len(gold), 12), IGNORE_INDEX)
    logits = torch.zeros(len(gold), 12, len(names))
    for row, (tags, guesses) in enumerate(zip(gold, predicted, strict=True)):
        for i, (tag, guess) in enumerate(zip(tags, guesses, strict=True)):
            labels[row, 1 + 2 * i] = ids[tag]
            logits[row, 1 + 2 * i, ids[guess]] = 5.0
    return logits, labels


@pytest.mark.parametrize("scheme", list(CASES))
def test_evaluation_counts_the_entities_predict_shows(scheme):
    gold, predicted = CASES[scheme]
    names = names_of(gold, predicted)
    metrics = TOKEN_CLASSIFICATION.make_metrics(names, DataConfig())  # the scheme detected
    # IOB1 and IOB2 have the same tag names: iob1 is read only when data.tag_scheme says so
    assert metrics.scheme == ("iob2" if scheme == "iob1" else scheme)
    metrics = TOKEN_CLASSIFICATION.make_metrics(names, DataConfig(tag_scheme=scheme))
    logits, labels = evaluation_batch(gold, predicted, names)
    metrics.update(logits, labels, torch.tensor(0.0), torch.tensor(1))
    expected = torch.zeros_like(metrics.counts)
    for gold_tags, predicted_tags in zip(gold, predicted, strict=True):
        shown = predicted_entities(predicted_tags, scheme)
        true = predicted_entities(gold_tags, scheme)  # gold read by the same decoder
        for row, kind in enumerate(metrics.types):
            mine = {e for e in shown if e[0] == kind}
            theirs = {e for e in true if e[0] == kind}
            expected[row] += torch.tensor(
                [len(mine & theirs), len(mine - theirs), len(theirs - mine)]
            )
    assert metrics.counts.tolist() == expected.tolist()
    assert expected[:, 0].sum() > 0 and expected[:, 1:].sum() > 0  # some right, some wrong
    results = metrics.compute(lambda t: t)
    if scheme in SEQEVAL:
        reference = seq_f1(gold, predicted, mode="strict", scheme=SEQEVAL[scheme])
        assert results["f1"] == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("scheme", list(CASES))
def test_a_perfect_prediction_scores_one_in_every_scheme(scheme):
    gold, _ = CASES[scheme]
    names = names_of(gold)
    metrics = TOKEN_CLASSIFICATION.make_metrics(names, DataConfig(tag_scheme=scheme))
    logits, labels = evaluation_batch(gold, gold, names)
    metrics.update(logits, labels, torch.tensor(0.0), torch.tensor(1))
    results = metrics.compute(lambda t: t)
    assert results["f1"] == results["precision"] == results["recall"] == 1.0
    assert set(results["f1_per_type"]) == {"PER", "LOC"}


# --- data.tag_scheme through `trainer train` ------------------------------------------------


def test_a_bad_tag_scheme_stops_the_run_before_training(capsys, run_config, tmp_path):
    config = run_config("token-classification")
    assert main(["train", str(config), "data.tag_scheme=bilou"]) == 2
    assert "data.tag_scheme: 'bilou' is not one of io, iob1, iob2" in capsys.readouterr().err
    for attempt in ("first read", "cache hit"):  # the scheme is no part of the cache key
        assert main(["train", str(config), "data.tag_scheme=io"]) == 2, attempt
        err = capsys.readouterr().err
        assert err.startswith("error: data.tag_scheme: io (set) has no tag like 'B-"), err
        assert len(err.splitlines()) == 1
    assert not (tmp_path / "run" / "final").exists()
