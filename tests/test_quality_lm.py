"""benchmarks/quality_lm.py: the text both sides read, the goal logic and the table, and the
Trainer side's CLM targets (every position, the end-of-text token's included)."""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks import hf_reference, quality_lm, run as runner
from benchmarks.comparison import Job


def write_imdb(folder, name: str, texts: list[str]) -> None:
    with (folder / name).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "rating", "label", "text"])
        writer.writerows([f"{name}/{i}", 1, i % 2, text] for i, text in enumerate(texts))


def test_texts_are_one_review_per_line_and_a_fixed_validation_sample(tmp_path, monkeypatch):
    write_imdb(tmp_path, "train_4000.csv", [f"train  review\n{i}<br />" for i in range(30)])
    write_imdb(tmp_path, "test_5000.csv", [f"test review {i}" for i in range(40)])
    monkeypatch.setattr(quality_lm, "DATA", tmp_path)
    form = quality_lm.Form(train_texts=20, validation_texts=10, steps=1, seeds=(0,))
    work = tmp_path / "work"
    work.mkdir()
    files = quality_lm.texts(form, work)
    train = Path(files["train"]).read_text().splitlines()
    assert train == [f"train review {i}<br />" for i in range(20)]  # whitespace made one space
    validation = Path(files["validation"]).read_text().splitlines()
    assert len(validation) == 10 and len(set(validation)) == 10
    assert all(line.startswith("test review ") for line in validation)
    assert validation != [f"test review {i}" for i in range(10)]  # a shuffled sample
    quality_lm.texts(form, work)
    assert Path(files["validation"]).read_text().splitlines() == validation  # the same every run


def result_with(perplexities: dict) -> dict:
    runs = {
        task: {
            side: [{"perplexity": p, "own_perplexity": p + 1, "steps": 40, "wall_s": 10.0}
                   for p in values]
            for side, values in sides.items()
        }
        for task, sides in perplexities.items()
    }  # fmt: skip
    return {"form": asdict(quality_lm.FORMS[True]), "runs": runs, "loads": [0.0]}


def test_goals_compare_mean_perplexity_over_seeds_and_the_table_shows_them():
    result = result_with(
        {
            "clm": {"ours": [150.0, 170.0], "Trainer": [161.0, 161.0]},  # 160 ≤ 161
            "mlm": {"ours": [90.0, 92.0], "Trainer": [80.0, 90.0]},  # 91 > 85
        }
    )
    assert quality_lm.goals(result["runs"]) == [
        ("ours clm perplexity ≤ Trainer clm (160.00 vs 161.00)", True),
        ("ours mlm perplexity ≤ Trainer mlm (91.00 vs 85.00)", False),
    ]
    text = quality_lm.markdown(json.loads(json.dumps(result)))
    assert text.startswith("## Language-modelling quality on IMDB text")
    assert "| clm | ours | 160.00 (150.00–170.00) | 161.00 (151.00–171.00) | 40 | 10 |" in text
    assert "| ours mlm perplexity ≤ Trainer mlm (91.00 vs 85.00) | no |" in text
    one_seed = result_with({"clm": {"ours": [170.0], "Trainer": [170.0]}})
    assert "| clm | Trainer | 170.00 | 171.00 | 40 | 10 |" in quality_lm.markdown(one_seed)
    assert quality_lm.goals(one_seed["runs"])[0][1]  # a tie matches


def test_quality_lm_is_its_own_section():
    assert runner.SECTIONS["quality-lm"] == "quality_lm"
    assert runner.section_module("quality-lm") is quality_lm


def test_trainer_clm_side_predicts_every_position_with_or_without_a_padding_token(
    gpt2_tokenizer, tmp_path
):
    """run_clm's targets: each block's own tokens, the end-of-text token included. A BPE
    tokenizer trained from scratch has no padding token, and GPT-2's usual pad = eos must not
    drop the end-of-text targets (DataCollatorForLanguageModeling did both)."""
    text = tmp_path / "text.txt"
    text.write_text("\n".join(f"the cat sat on mat number {i} today" for i in range(40)) + "\n")
    job = Job("clm", "clm", str(text), str(text), max_length=16, metrics=("perplexity",))
    eos = gpt2_tokenizer.eos_token_id
    padded = copy.deepcopy(gpt2_tokenizer)
    padded.pad_token = padded.eos_token
    for tokenizer in (gpt2_tokenizer, padded):
        data, collator = hf_reference.packed_data(job, tokenizer)
        batch = collator([data["train"][i] for i in range(4)])
        assert batch["input_ids"].shape == (4, 16)
        assert (batch["input_ids"] == eos).any()
        assert batch["labels"].tolist() == batch["input_ids"].tolist()


def test_run_gives_every_task_side_and_seed_its_own_result(tmp_path, monkeypatch):
    """Each result lands under its own task and side, in seed order, and the tokenizer is
    trained once per task; a form may name one task."""
    form = quality_lm.Form(train_texts=2, validation_texts=1, steps=1, seeds=(7, 8))
    monkeypatch.setitem(quality_lm.FORMS, True, form)
    monkeypatch.setattr(quality_lm, "texts", lambda form, work: {"train": "t", "validation": "v"})
    trained = []
    monkeypatch.setattr(
        quality_lm, "train_tokenizer", lambda task, *rest: trained.append(task) or Path(task)
    )
    monkeypatch.setattr(quality_lm, "build_model", lambda task, form, tok, folder, seed: folder)

    def side(name):
        return lambda task, seed, form, files, model, work: {"side": name, "model": model.name}

    monkeypatch.setattr(quality_lm, "SIDES", {"ours": side("ours"), "Trainer": side("hf")})
    result = quality_lm.run(True, tmp_path)
    assert trained == ["clm", "mlm"]
    assert result["runs"]["mlm"]["Trainer"] == [
        {"side": "hf", "model": "mlm-init-2-7"},
        {"side": "hf", "model": "mlm-init-2-8"},
    ]
    assert result["runs"]["clm"]["ours"][1] == {"side": "ours", "model": "clm-init-2-8"}
    assert len(result["loads"]) == 4  # one a seed and task (both sides together)
    only = quality_lm.run(True, tmp_path, form=replace(form, tasks=("clm",)))
    assert list(only["runs"]) == ["clm"] and len(only["runs"]["clm"]["ours"]) == 2
