"""benchmarks/dpo.py: both sides are given the same job (our settings pass the engine's
config checks, TRL's config pins the same numbers and turns off its bf16 and gradient
checkpointing), TRL's preparation of the mixed text/chat pairs gives our engine's token
ids in file order, and the section's tiny form trains both sides on the same batches and
renders what it measured."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, replace

import pytest

from benchmarks import dpo, run as runner
from benchmarks.common import read_jsonl

TINY = dpo.Form(layers=1, hidden=64, batch_size=8, steps=3, rounds=1, lr=1e-2, train_rows=64)


def test_the_section_runs_with_only_dpo():
    assert runner.EXTRA["dpo"] == "dpo" and runner.section_module("dpo") is dpo
    assert runner.parse_args(["--quick", "--only", "dpo"]).sections == ["dpo"]
    assert dpo.FORMS[True] == replace(dpo.FORMS[False], steps=10, rounds=1)


@pytest.mark.parametrize("way", dpo.WAYS[::2], ids=lambda way: way.name)
def test_our_settings_pass_the_config_checks(way, tmp_path):
    from trainer.config import build_config

    settings = dpo.ours_settings(tmp_path / "model", dpo.TRAIN, TINY, way, tmp_path)
    cfg = build_config({**settings, "output_dir": str(tmp_path / "run")})
    assert (cfg.task, cfg.preference.beta, cfg.data.max_length) == ("preference", 0.1, 128)
    assert cfg.preference.precompute_reference is way.precompute
    assert cfg.train.global_batch_size == cfg.train.micro_batch_size == TINY.batch_size
    assert (cfg.train.weight_decay, cfg.train.warmup_ratio, cfg.train.max_grad_norm) == (0, 0, 1)
    assert cfg.peft.method == ("lora" if way.method == "lora" else "none")
    if way.method == "lora":
        assert (cfg.peft.r, cfg.peft.alpha, cfg.peft.dropout) == (8, 16.0, 0.0)


def test_trls_config_pins_the_same_job_and_turns_off_what_would_change_it(tmp_path):
    spec = {"out_dir": str(tmp_path), "precompute": True}
    args = dpo.trl_config(TINY, spec)
    assert args.bf16 is False and args.gradient_checkpointing is False
    assert (args.learning_rate, args.max_length, args.beta) == (1e-2, 128, 0.1)
    assert args.per_device_train_batch_size == TINY.batch_size and args.max_steps == 3
    assert (args.weight_decay, args.max_grad_norm, args.warmup_steps) == (0.0, 1.0, 0)
    assert args.loss_type == ["sigmoid"] and args.precompute_ref_log_probs is True
    assert args.gradient_accumulation_steps == 1 and args.lr_scheduler_type == "linear"


def test_trls_preparation_of_mixed_rows_gives_our_token_ids_in_order(tiny_llama_chat, tmp_path):
    import datasets
    import transformers

    from trainer.data.preference_encode import pair_tokens

    rows = read_jsonl(dpo.TRAIN)[:12]
    assert 0 < sum(isinstance(r["prompt"], list) for r in rows) < len(rows)  # both kinds
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama_chat)
    trainer = dpo.mixed_rows_trainer()(
        model=transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_chat),
        args=dpo.trl_config(TINY, {"out_dir": str(tmp_path), "precompute": False}),
        train_dataset=datasets.Dataset.from_list([{"row": json.dumps(r)} for r in rows]),
        processing_class=tokenizer,
    )
    prepared = trainer.train_dataset
    assert len(prepared) == len(rows)
    for row, theirs in zip(rows, prepared, strict=True):
        chosen, rejected = pair_tokens(tokenizer, row)
        assert theirs["prompt_ids"] + theirs["chosen_ids"] == chosen.ids
        assert theirs["prompt_ids"] + theirs["rejected_ids"] == rejected.ids


@pytest.fixture(scope="module")
def dpo_result(tmp_path_factory) -> dict:
    """The section at a tiny size, every run a real process (6 trainings)."""
    found = dpo.run(True, tmp_path_factory.mktemp("dpo"), form=TINY)
    return json.loads(json.dumps(found))


@pytest.mark.slow
def test_dpo_section_trains_both_sides_alike_and_renders(dpo_result):
    runs = dpo_result["runs"]
    assert list(runs) == [way.name for way in dpo.WAYS]
    assert dpo_result["form"] == asdict(TINY) and dpo_result["data"]["pairs"] == 64
    assert dpo_result["data"]["max_tokens"] <= TINY.max_length  # nothing truncated
    # the same seeded batches of the same token ids: equal tokens per step on every run
    tokens = runs["ours LoRA"]["tokens"]
    assert len(tokens) == TINY.steps and all(r["tokens"] == tokens for r in runs.values())
    for name, r in runs.items():
        assert r["tokens_per_s"] > 0 and r["timed_steps"] == TINY.steps - 1, name
        assert len(r["elapsed_s"]) == TINY.steps and sorted(r["elapsed_s"]) == r["elapsed_s"]
        timed = r["elapsed_s"][-1] - r["elapsed_s"][0]
        assert r["tokens_per_s"] == pytest.approx(sum(tokens[1:]) / timed, rel=1e-9), name
        assert r["peak_rss_mb"] > 100 and r["pad_share"] == runs["TRL full"]["pad_share"]
        assert r["first_loss"] == pytest.approx(math.log(2), abs=1e-6), name  # policy = ref
    # the reference's scores precomputed or from a frozen copy: the same training, each side
    for side in ("ours", "TRL"):
        precomputed = runs[f"{side} full, precomputed reference"]["last_loss"]
        assert precomputed == pytest.approx(runs[f"{side} full"]["last_loss"], abs=1e-5), side
        assert runs[f"{side} full"]["last_loss"] < math.log(2) - 0.005, side  # it learned

    text = dpo.markdown(dpo_result)
    assert text.startswith("## Preference tuning: DPO throughput")
    assert all(f"| {name} |" in text for name in runs)
    assert "| LoRA: ours / TRL |" in text and "| full: ours / TRL |" in text
