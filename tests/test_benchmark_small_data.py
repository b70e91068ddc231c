"""benchmarks/small_data.py without training: each seed runs the four arms on the quality
section's rows (the longer arm with 3x the epochs), EDA reaching the run config as
data.augment, and the table and checks it renders from a stored result."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
from test_benchmark_dapt import _imdb

from benchmarks import engine, quality, small_data


def _record(accuracy: float, trainable: int) -> dict:
    return {
        "accuracy": accuracy,
        "f1": accuracy - 0.01,
        "wall_s": 20.0,
        "steps": 64,
        "trainable_parameters": trainable,
        "parameters": 22_713_216,
    }


def test_every_seed_runs_the_three_arms_on_the_same_rows(tmp_path, monkeypatch):
    _imdb(tmp_path, 60, 30)
    monkeypatch.setattr(quality, "DATA", tmp_path)
    calls = []

    def fake(method, seed, form, files, work_dir, augment=None):
        calls.append((method, seed, dict(augment or {}), form.epochs, files["train"]))
        return _record(0.5, 1)

    monkeypatch.setattr(quality, "ours", fake)
    form = replace(small_data.FORMS[False], train_rows=40, validation_rows=10, test_rows=20)
    result = small_data.run(False, tmp_path, form=form)
    eda = {"copies": 2, "synonyms": str(small_data.SYNONYMS)}
    assert [call[:4] for call in calls] == [
        (method, seed, augment, epochs)
        for seed in (0, 1, 2)
        for method, augment, epochs in (("lora", {}, 4), ("full", {}, 4), ("lora", eda, 4),
                                        ("lora", {}, 12))
    ]  # fmt: skip
    assert len({train for *_, train in calls}) == 1
    assert {arm: len(runs) for arm, runs in result["runs"].items()} == dict.fromkeys(
        small_data.ARMS, 3
    )


def test_the_augment_settings_reach_the_run_config(tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_train(run_dir, settings, config=None):
        seen["settings"], seen["config"] = settings, config
        raise Stop

    monkeypatch.setattr(engine, "train", fake_train)
    files = {"train": "t.csv", "validation": "v.csv"}
    eda = {"copies": 2, "synonyms": "syn.tsv"}
    with pytest.raises(Stop):
        quality.ours("lora", 1, small_data.FORMS[True], files, tmp_path, eda)
    assert seen["settings"]["data"]["augment"] == eda
    assert seen["config"] == quality.RECIPES["lora"]
    with pytest.raises(Stop):
        quality.ours("full", 1, small_data.FORMS[True], files, tmp_path)
    assert "augment" not in seen["settings"]["data"]


def test_markdown_and_checks_follow_the_means():
    result = {
        "form": asdict(small_data.FORMS[False]),
        "copies": 2,
        "loads": [0.0],
        "runs": {
            "LoRA": [_record(0.80, 10), _record(0.84, 10)],
            "full": [_record(0.81, 100), _record(0.81, 100)],
            "LoRA + EDA": [_record(0.79, 10), _record(0.80, 10)],
            "LoRA, 3x epochs": [_record(0.78, 10), _record(0.80, 10)],
        },
    }
    assert small_data.goals(result["runs"]) == [
        ("LoRA ≥ full (0.8200 vs 0.8100)", True),
        ("LoRA + EDA > LoRA (0.7950 vs 0.8200)", False),
        ("LoRA + EDA > LoRA, 3x epochs (0.7950 vs 0.7900)", True),
    ]
    text = small_data.markdown(json.loads(json.dumps(result)))
    assert text.startswith("## Small data (scenario B): 500 IMDB rows")
    assert "| LoRA | 0.8200 (0.8000–0.8400) | 0.8100 (0.7900–0.8300) | 64 | 20 |" in text
    assert "| LoRA + EDA > LoRA (0.7950 vs 0.8200) | no |" in text
