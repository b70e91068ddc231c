"""benchmarks/dapt.py without training: the rows it carves from IMDB (fixed, disjoint, the
TAPT text unlabelled and one review a line), and the table it renders from a stored result."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, replace

import pytest

from benchmarks import dapt


def _imdb(folder, train_rows: int, test_rows: int) -> None:
    for name, rows in (("train_4000.csv", train_rows), ("test_5000.csv", test_rows)):
        with (folder / name).open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "rating", "label", "text"])
            writer.writerows(
                [f"{name}/{i}", 1, i % 2, f"review {name}\n<br />line {i}"] for i in range(rows)
            )


def _read(path: str) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_split_is_fixed_disjoint_and_the_tapt_text_unlabelled(tmp_path, monkeypatch):
    _imdb(tmp_path, 60, 30)
    monkeypatch.setattr(dapt, "DATA", tmp_path)
    form = replace(dapt.FORMS[True], tapt_rows=40, labelled_rows=10, validation_rows=15)
    form = replace(form, test_rows=20)
    work = tmp_path / "work"
    work.mkdir()
    files = dapt.split(form, work)
    tapt = (work / "tapt.txt").read_text().splitlines()
    labelled, validation = _read(files["labelled"]), _read(files["validation"])
    assert [len(tapt), len(labelled), len(validation), len(_read(files["test"]))] == [
        40,
        10,
        15,
        20,
    ]
    assert all("\n" not in line and "positive" not in line for line in tapt)
    flat = {" ".join(r["text"].split()) for r in labelled}
    assert flat <= set(tapt)  # the labelled share is among the TAPT texts
    assert not {" ".join(r["text"].split()) for r in validation} & set(tapt)
    assert dapt.split(form, work) == files and (work / "tapt.txt").read_text().splitlines() == tapt


def _arm(accuracy: float, tapt: dict | None = None) -> dict:
    record = {"seed": 0, "accuracy": accuracy, "f1": accuracy, "wall_s": 10.0}
    record["new_parameters"] = ["classifier.weight", "classifier.bias"]
    if tapt is not None:
        record["tapt"] = {"wall_s": 5.0, "new_parameter_count": 179130, **tapt}
    return record


def test_markdown_gives_each_arm_its_gain_over_fine_tuning_alone():
    losses = {"first_loss": 10.5, "last_loss": 6.25}
    result = {
        "form": asdict(dapt.FORMS[True]),
        "loads": [0.0],
        "runs": {
            dapt.BASELINE: [_arm(0.80)],
            "TAPT, no head warm-up": [_arm(0.79, {"head_warmup_steps": 0, **losses})],
            "TAPT, head warm-up (default)": [_arm(0.825, {"head_warmup_steps": 3, **losses})],
        },
    }
    assert dapt.gains(result["runs"]) == pytest.approx(
        {"TAPT, no head warm-up": -1.0, "TAPT, head warm-up (default)": 2.5}
    )
    text = dapt.markdown(json.loads(json.dumps(result)))
    assert text.startswith("## TAPT → fine-tune on IMDB, against fine-tuning alone")
    assert "| fine-tune alone | 0.8000 | 0.8000 |  |  |  | 10 |" in text
    assert "| TAPT, no head warm-up | 0.7900 | 0.7900 | -1.00 | 0 | 10.50 → 6.25 | 15 |" in text
    assert "| TAPT, head warm-up (default) | 0.8250 | 0.8250 | +2.50 | 3 |" in text
    assert "Best gain here: +2.50 points." in text
    assert "1000 IMDB train reviews without labels, 30 steps" in text


def test_markdown_shows_the_spread_over_seeds():
    result = {
        "form": asdict(dapt.FORMS[False]),
        "loads": [0.0],
        "runs": {dapt.BASELINE: [_arm(0.80), _arm(0.84)]},
    }
    assert "| fine-tune alone | 0.8200 (0.8000–0.8400) |" in dapt.markdown(result)
