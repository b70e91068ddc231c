"""benchmarks/preference_rule.py: the held-out prompts are the validation pairs' questions
with their chosen answers; the pleasantries' demonstrations are data/sft's with half the
answers after the pleasantry; the pairs are trained as chat turns; and the section's tiny
form runs SFT, then DPO plain and with the NLL term from the SFT model, and renders every
model's rewards, answers and goals."""

from __future__ import annotations

import json

import pytest

from benchmarks import preference_rule as section, run as runner
from benchmarks.common import read_jsonl

TINY = section.Form(
    layers=1,
    hidden=64,
    stages=(("pleasantries", 1),),
    dpo_epochs=1,
    dpo_lr=1e-3,
    batch_size=8,
    train_rows=64,
    prompts=6,
)


def test_the_section_runs_with_only_preference():
    assert runner.section_module("preference") is section
    assert section.FORMS[True].stages == (("pleasantries", 2),)
    assert {source for source, _ in section.FORMS[False].stages} == set(section.SOURCES)


def test_the_pleasantries_are_the_clean_demonstrations_with_half_the_answers_changed(tmp_path):
    form = section.Form(train_rows=400)
    clean = read_jsonl(section.demonstrations("clean", form, tmp_path))
    changed = read_jsonl(section.demonstrations("pleasantries", form, tmp_path))
    assert len(clean) == len(changed) == 400
    pleasantry = section.make_pairs().PLEASANTRY
    answers = same = 0
    for before, after in zip(clean, changed, strict=True):
        for old, new in zip(before["messages"], after["messages"], strict=True):
            assert old["role"] == new["role"]
            if old["role"] != "assistant" or old == new:
                assert old == new
                same += old["role"] == "assistant"
            else:
                assert new["content"] == pleasantry + old["content"]
            answers += old["role"] == "assistant"
    assert 0.4 < same / answers < 0.6


def test_the_pairs_are_trained_as_chat_turns_and_half_reject_the_pleasantry(tmp_path):
    rows = read_jsonl(section.DATA / "train.jsonl")
    chat = read_jsonl(section.chat_pairs("train.jsonl", section.Form(), tmp_path))
    assert len(chat) == len(rows) == 1000
    pleasantry = section.make_pairs().PLEASANTRY
    for row, turns in zip(rows, chat, strict=True):
        assert [t["role"] for t in turns["prompt"]] == ["user"]
        for key in ("prompt", "chosen", "rejected"):
            text = row[key] if isinstance(row[key], str) else row[key][-1]["content"]
            assert turns[key][-1]["content"] == text.strip()
    rejected = [turns["rejected"][0]["content"] for turns in chat]
    chosen = [turns["chosen"][0]["content"] for turns in chat]
    polite = [r == pleasantry + c for r, c in zip(rejected, chosen, strict=True)]
    assert 0.45 < sum(polite) / len(polite) < 0.55
    assert not any(pleasantry in c for c in chosen)


def test_held_out_prompts_are_the_questions_and_their_chosen_answers():
    prompts = section.held_out(section.Form())
    rows = read_jsonl(section.DATA / "validation.jsonl")
    assert len(prompts) == len(rows) == 200
    for prompt, row in zip(prompts, rows, strict=True):
        asked = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
        chosen = row["chosen"] if isinstance(row["chosen"], str) else row["chosen"][-1]["content"]
        assert prompt == {"prompt": asked, "completion": chosen.strip()}
        assert prompt["prompt"].split(":")[0] in {"count", "first", "last", "reverse", "sort"}


@pytest.mark.slow
def test_the_tiny_form_runs_sft_then_both_dpo_variants_and_renders(tmp_path):
    result = json.loads(json.dumps(section.run(True, tmp_path, form=TINY)))
    assert result["prompts"] == 6
    [stage] = result["stages"]
    assert (stage["source"], stage["sft_epochs"]) == ("pleasantries", 1)
    assert [d["sft_weight"] for d in stage["dpo"]] == [0, 1]
    # each DPO run starts from the SFT model and scores the 200 held-out pairs
    for dpo in stage["dpo"]:
        assert 0 <= dpo["reward_accuracy"] <= 1 and dpo["steps"] == 8  # 64 pairs / 8
        log = (tmp_path / f"dpo-pleasantries-1-{dpo['sft_weight']:g}.yaml").read_text()
        assert str(tmp_path / "sft-pleasantries-1" / "final") in log
    plain, with_nll = stage["dpo"]
    assert plain["reward_margin"] != with_nll["reward_margin"]  # the NLL term changes training
    for found in [result["base"], stage["sft"], plain["after"], with_nll["after"]]:
        assert 0 <= found["exact_match"] <= found["contains"] <= 1
        assert set(found["by_rule"]) <= {"count", "first", "last", "reverse", "sort"}
        assert all(0 <= v <= 1 for v in found["by_rule"].values())
    text = section.markdown(result)
    assert text.startswith("## Preference tuning after SFT")
    names = (
        "SFT pleasantries 1 epoch(s)",
        "SFT pleasantries 1 + DPO",
        "SFT pleasantries 1 + DPO + NLL x1",
    )
    for name in ("random base", *names):
        assert f"| {name} |" in text
    before = stage["sft"]["exact_match"]
    for dpo in stage["dpo"]:
        after = dpo["after"]["exact_match"]
        met = "yes" if after > before else "no"
        assert f"exact match {before:.3f} → {after:.3f} | {met} |" in text
