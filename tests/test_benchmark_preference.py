"""benchmarks/preference_rule.py: the held-out prompts are the validation pairs' questions
with their chosen answers, and the section's tiny form runs SFT, then DPO plain and with
the NLL term from the SFT model, and renders every model's rewards and answers."""

from __future__ import annotations

import json

import pytest

from benchmarks import preference_rule as section, run as runner
from benchmarks.common import read_jsonl

TINY = section.Form(
    layers=1,
    hidden=64,
    sft_epochs=(1,),
    dpo_epochs=1,
    dpo_lr=1e-3,
    batch_size=8,
    train_rows=64,
    prompts=6,
)


def test_the_section_runs_with_only_preference():
    assert runner.section_module("preference") is section
    assert section.FORMS[True].sft_epochs == (2,) and section.FORMS[False].sft_epochs == (2, 5)


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
    assert stage["sft_epochs"] == 1 and [d["sft_weight"] for d in stage["dpo"]] == [0, 1]
    # each DPO run starts from the SFT model and scores the 200 held-out pairs
    for dpo in stage["dpo"]:
        assert 0 <= dpo["reward_accuracy"] <= 1 and dpo["steps"] == 8  # 64 pairs / 8
        log = (tmp_path / f"dpo-1-{dpo['sft_weight']:g}.yaml").read_text()
        assert str(tmp_path / "sft-1" / "final") in log
    plain, with_nll = stage["dpo"]
    assert plain["reward_margin"] != with_nll["reward_margin"]  # the NLL term changes training
    for found in [result["base"], stage["sft"], plain["after"], with_nll["after"]]:
        assert 0 <= found["exact_match"] <= found["contains"] <= 1
        assert set(found["by_rule"]) <= {"count", "first", "last", "reverse", "sort"}
        assert all(0 <= v <= 1 for v in found["by_rule"].values())
    text = section.markdown(result)
    assert text.startswith("## Preference tuning after SFT")
    for name in ("random base", "SFT 1 epoch(s)", "SFT 1 + DPO", "SFT 1 + DPO + NLL x1"):
        assert f"| {name} |" in text
