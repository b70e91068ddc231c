"""`trainer plan` on sft configs: the examples are what training gets (packed rows, rows
data.truncation drops), and the activations count the causal LM's vocabulary logits."""

from __future__ import annotations

import json

import pytest
from conftest import reset_accelerate
from test_sft import reverse_rows, sft_config, train, write_jsonl
from tiny_models import WORDS

from launch.plan import make_plan
from trainer.cli import main

ROWS = 64


@pytest.fixture
def sft_argv(tmp_path, tiny_llama_chat):
    rows = reverse_rows(ROWS, 11, "messages")
    rows[:3] = [
        {
            "messages": [
                {"role": "user", "content": " ".join(WORDS[:40])},
                {"role": "assistant", "content": "good"},
            ]
        }
    ] * 3  # over max_length 64 (the other rows are not): data.truncation=drop drops them
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    return lambda **settings: sft_config(
        tmp_path, tiny_llama_chat, train_file, **({"data.max_length": 64} | settings)
    )


def trained_examples(argv: list[str], tmp_path) -> int:
    assert train([*argv, "train.max_steps=1"]) == 0
    return json.loads((tmp_path / "run" / "run_summary.json").read_text())["train_examples"]


@pytest.mark.parametrize(
    ("settings", "examples"),
    [
        ({}, ROWS),
        ({"data.truncation": "drop"}, ROWS - 3),
        ({"data.packing": "true", "data.max_length": 128}, None),  # as many as training packs
    ],
)
def test_the_plans_examples_and_steps_are_the_runs(sft_argv, tmp_path, capsys, settings, examples):
    argv = sft_argv(**settings)
    plan = make_plan(argv[0], "cpu-2proc", argv[1:])
    assert plan.accumulation == 1 and plan.steps_per_epoch == plan.data.examples // 8
    assert plan.data.examples == trained_examples(argv, tmp_path)
    if examples is not None:
        assert plan.data.examples == examples
    else:
        assert plan.data.examples < ROWS / 2
    reset_accelerate()
    assert main(["plan", argv[0], "--cluster", "cpu-2proc", *argv[1:]]) == 0
    out = capsys.readouterr().out
    assert "(task sft)" in out and f"training examples   {plan.data.examples} after" in out
    if "data.packing" in settings:
        assert "rows of packed examples hold at most that many tokens" in out


def test_activations_count_the_vocabulary_logits(sft_argv):
    argv = sft_argv(**{"train.micro_batch_size": 1})
    plan = make_plan(argv[0], "8gpu-ddp", argv[1:])  # bf16: activations in 16 bits
    p, b, s = plan.params, 1, 64
    layer = 34 * s * b * p.hidden + 5 * p.heads * s * s * b
    assert (p.model_class, p.layers) == ("LlamaForCausalLM", 2)
    assert plan.memory[0].activations == p.layers * layer + s * b * p.vocab * 4


def test_packed_rows_are_unknown_without_the_tokenizer(sft_argv):
    """Unpacked, a row is an example (an upper bound where drop drops some); packed, how
    many rows the examples fill takes the tokenizer."""
    missing = "model.name_or_path=no-org/no-model"
    plain = sft_argv(**{"model.name_or_path": "no-org/no-model"})
    assert make_plan(plain[0], "1gpu", plain[1:]).data.examples == ROWS
    packed = sft_argv(**{"model.name_or_path": "no-org/no-model", "data.packing": "true"})
    plan = make_plan(packed[0], "1gpu", packed[1:])
    assert plan.data.examples is None and missing.split("=")[1] in plan.data.unknown
