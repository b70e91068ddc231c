"""Supervised fine-tuning: which tokens are targets (answers only, each ending with EOS),
the three row formats, truncation that never trains on nothing, the bad-row lines, and
the loss normalised over the answer tokens of the whole accumulation window."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import read_metrics, reset_accelerate
from tiny_models import WORDS
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.cli import main
from trainer.config import DataConfig
from trainer.data.chat_encode import encode_chat, row_tokens
from trainer.data.chat_templates import set_chat_template
from trainer.data.collate import PackedExamplesCollator, PaddingCollator
from trainer.data.read import Split
from trainer.run.forward import model_inputs
from trainer.tasks.losses import next_token_loss

TWO_TURNS = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "good day"},
    {"role": "assistant", "content": "bad night"},
    {"role": "user", "content": "red blue"},
    {"role": "assistant", "content": "green"},
]


def trained_text(tokenizer, row: dict, **options) -> str:
    tokens = row_tokens(tokenizer, row, **options)
    return tokenizer.decode([i for i, on in zip(tokens.ids, tokens.trained, strict=True) if on])


@pytest.fixture
def chat_tokenizer(tiny_llama_chat):
    return AutoTokenizer.from_pretrained(tiny_llama_chat)


def test_turn_by_turn_rendering_trains_on_every_answer_with_its_end_of_turn(chat_tokenizer):
    """The tokenizer's own ChatML has no generation markers: each answer is what its
    turn adds to the rendering, up to and with <|im_end|> (EOS) and its newline."""
    row = {"messages": TWO_TURNS}
    assert trained_text(chat_tokenizer, row) == "bad night<|im_end|>\ngreen<|im_end|>\n"
    assert trained_text(chat_tokenizer, row, last_only=True) == "green<|im_end|>\n"
    everything = chat_tokenizer.apply_chat_template(TWO_TURNS, tokenize=False)
    assert trained_text(chat_tokenizer, row, on_prompt=True) == everything


def test_generation_markers_give_the_templates_own_mask(chat_tokenizer):
    set_chat_template(chat_tokenizer, DataConfig(chat_template="chatml"))
    row = {"messages": TWO_TURNS}
    assert trained_text(chat_tokenizer, row) == "bad night<|im_end|>green<|im_end|>"
    # the same tokens are rendered either way; only the newline after each turn differs
    plain = AutoTokenizer.from_pretrained(chat_tokenizer.name_or_path)
    assert row_tokens(chat_tokenizer, row).ids == row_tokens(plain, row).ids


def test_a_plain_completion_ends_with_eos_as_a_target(tiny_gpt2):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    row = {"prompt": "good day ->", "completion": " bad night"}
    assert trained_text(tokenizer, row) == " bad night<|endoftext|>"
    tokens = row_tokens(tokenizer, row)
    assert tokens.ids[-1] == tokenizer.eos_token_id and tokens.trained[-1]
    # already ending with EOS: not a second one
    twice = row_tokens(tokenizer, {**row, "completion": " bad night<|endoftext|>"})
    assert twice.ids == tokens.ids


def reverse_rows(count: int, seed: int, shape: str) -> list[dict]:
    """Rows of a rule a tiny model can learn: the answer is the prompt's words reversed
    (answers of 1 to 4 words, so rows hold different numbers of answer tokens)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.sample(WORDS, rng.randint(1, 4))
        asked, answer = "reverse: " + " ".join(words), " ".join(reversed(words))
        if shape == "messages":
            rows.append({"messages": [{"role": "user", "content": asked},
                                      {"role": "assistant", "content": answer}]})  # fmt: skip
        elif shape == "alpaca":
            rows.append({"instruction": "reverse", "input": " ".join(words), "output": answer})
        else:
            rows.append({"prompt": asked + " ->", "completion": " " + answer})
    return rows


def write_jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_config(tmp_path, model, train, **sections) -> list[str]:
    settings = {
        "task": "sft",
        "output_dir": str(tmp_path / "run"),
        "model.name_or_path": str(model),
        "data.train": str(train),
        "data.max_length": 48,
        "data.cache_dir": str(tmp_path / "cache"),
        "train.epochs": 1,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 8,
        "train.lr": 1e-3,
        "train.warmup_ratio": 0.0,
        "log.every_steps": 1,
        "log.trackers": "[]",
    }
    settings |= sections
    tmp_path.mkdir(exist_ok=True)
    config = tmp_path / "sft.yaml"
    config.write_text("task: sft\n")
    return [str(config), *(f"{k}={v}" for k, v in settings.items() if k != "task")]


def train(argv: list[str]) -> int:
    reset_accelerate()
    return main(["train", *argv])


@pytest.mark.parametrize("shape", ["messages", "alpaca", "pairs"])
def test_each_row_format_trains_and_its_loss_falls(tmp_path, tiny_llama_chat, shape):
    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_rows(64, 0, shape))
    argv = sft_config(tmp_path, tiny_llama_chat, train_file, **{"train.epochs": 3})
    assert train(argv) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(losses) == 24 and losses[-1] < losses[0] - 0.3
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert saved.chat_template  # the template trained with is the one predict renders with


def test_one_micro_batch_of_8_equals_8_of_1(tmp_path, tiny_llama_chat):
    """The loss is a mean over the answer tokens of the whole step, whatever the split into
    micro-batches: rows hold 2 to 11 answer tokens, so a mean of per-micro-batch means
    (the 2024 gradient-accumulation bug) would differ."""
    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_rows(8, 1, "messages"))
    found = []
    for micro in (8, 1):
        out = tmp_path / f"micro-{micro}"
        settings = {"train.micro_batch_size": micro, "train.max_steps": 2}
        argv = sft_config(out, tiny_llama_chat, train_file, **settings)
        assert train(argv) == 0
        found.append(
            [(r["loss"], r["grad_norm"]) for r in read_metrics(out / "run") if "loss" in r]
        )
    assert len(found[0]) == 2
    for (loss_a, norm_a), (loss_b, norm_b) in zip(*found, strict=True):
        assert loss_a == pytest.approx(loss_b, abs=1e-6)
        assert norm_a == pytest.approx(norm_b, rel=1e-5)


def test_truncation_keeps_the_end_or_drops_the_row_and_says_so(tmp_path, tiny_llama_chat, capsys):
    rows = reverse_rows(16, 2, "messages")
    long = " ".join(WORDS[:40])
    rows[0] = {"messages": [{"role": "user", "content": long},
                            {"role": "assistant", "content": "good"}]}  # fmt: skip
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_chat)
    tokens = row_tokens(tokenizer, rows[0])
    assert len(tokens.ids) > 64 and tokens.trained[-1]
    others = [len(row_tokens(tokenizer, row).ids) for row in rows[1:]]
    assert max(others) <= 64

    argv = sft_config(tmp_path / "keep", tiny_llama_chat, train_file, **{"data.max_length": 64})
    assert train(argv) == 0
    summary = json.loads((tmp_path / "keep" / "run" / "run_summary.json").read_text())
    assert summary["train_examples"] == 16 and "dropped_rows" not in summary

    argv = sft_config(tmp_path / "drop", tiny_llama_chat, train_file,
                      **{"data.truncation": "drop", "data.max_length": 64})  # fmt: skip
    assert train(argv) == 0
    summary = json.loads((tmp_path / "drop" / "run" / "run_summary.json").read_text())
    assert summary["train_examples"] == 15 and summary["dropped_rows"] == {"train-0": 1}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
        ({"messages": "hi"}, "'messages' must be a list"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": " "},
                ]
            },
            "empty assistant turn",
        ),
        ({"prompt": "hi", "completion": ""}, "empty answer in column 'completion'"),
        ({"question": "hi"}, "expected a 'messages' column"),
    ],
)
def test_a_bad_row_is_one_line_naming_the_file_and_row(
    tmp_path, tiny_llama_chat, capsys, row, message
):
    rows = [*reverse_rows(3, 3, "messages"), row]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    assert train(sft_config(tmp_path, tiny_llama_chat, train_file)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.train: train.jsonl line 4: ")
    assert message in err[0]


def test_messages_on_a_base_model_without_a_template_say_what_to_set(tmp_path, tiny_gpt2, capsys):
    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_rows(8, 4, "messages"))
    assert train(sft_config(tmp_path, tiny_gpt2, train_file)) == 2
    err = capsys.readouterr().err
    assert "set data.chat_template to a Jinja file or one of chatml, llama-3" in err
    assert (
        train(sft_config(tmp_path, tiny_gpt2, train_file, **{"data.chat_template": "chatml"})) == 0
    )
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    assert "<|im_start|>" in saved.chat_template


def test_an_unknown_template_name_is_a_config_error(tmp_path, tiny_gpt2, capsys):
    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_rows(4, 4, "pairs"))
    assert (
        train(sft_config(tmp_path, tiny_gpt2, train_file, **{"data.chat_template": "vicuna"})) == 2
    )
    assert (
        "data.chat_template: vicuna is neither a file nor a known name" in capsys.readouterr().err
    )


def example_losses(model, batch: dict, spans: list[list[range]]) -> list[float]:
    """Each example's summed answer-token loss, from its positions in the batch."""
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    per_token = F.cross_entropy(
        logits.transpose(1, 2), shifted, ignore_index=-100, reduction="none"
    )
    return [
        per_token[row, span].sum().item()
        for row, row_spans in enumerate(spans)
        for span in row_spans
    ]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("on_prompt", [False, True])
def test_a_packed_example_has_the_loss_it_has_alone(tiny_llama_chat, attention, on_prompt):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_chat)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_chat, attn_implementation=attention)
    rows = reverse_rows(7, 7, "messages")
    split = Split("data.train", rows, [f"row {i}" for i in range(len(rows))])
    settings = {"max_length": 128, "train_on_prompt": on_prompt}
    packed = list(encode_chat(split, tokenizer, DataConfig(packing=True, **settings)))
    alone = list(encode_chat(split, tokenizer, DataConfig(**settings)))
    assert len(packed) < len(alone)  # several examples share a row
    batch = PackedExamplesCollator(tokenizer.pad_token_id)(packed)
    assert batch["real_mask"].sum() == sum(
        len(e["input_ids"]) for e in alone
    )  # no padding in a row
    spans = []
    for example in packed:
        starts = [
            sum(example["example_lengths"][:i]) for i in range(len(example["example_lengths"]))
        ]
        spans.append(
            [range(s, s + n) for s, n in zip(starts, example["example_lengths"], strict=True)]
        )
    # packing reorders the examples (longest first): each is matched to itself by its tokens
    packed_ids = [
        tuple(e["input_ids"][i] for i in span)
        for e, row in zip(packed, spans, strict=True)
        for span in row
    ]
    together = dict(zip(packed_ids, example_losses(model, batch, spans), strict=True))
    single = {
        tuple(e["input_ids"]): example_losses(
            model, PaddingCollator(tokenizer.pad_token_id)([e]), [[range(len(e["input_ids"]))]]
        )[0]
        for e in alone
    }
    assert len(single) == len(alone) and together.keys() == single.keys()
    assert [together[k] for k in single] == pytest.approx(list(single.values()), abs=1e-5)
    _, count = next_token_loss(model(**model_inputs(batch)).logits, batch["labels"])
    assert count == sum(sum(1 for x in e["labels"][1:] if x != -100) for e in alone)


def test_a_packed_run_trains(tmp_path, tiny_llama_chat):
    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_rows(96, 0, "messages"))
    settings = {"data.packing": "true", "data.max_length": 128, "train.epochs": 6}
    assert train(sft_config(tmp_path, tiny_llama_chat, train_file, **settings)) == 0
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["train_examples"] < 96 / 2  # rows of several examples
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    assert all(r["pad_fraction"] < 0.35 for r in records)
    # the logged targets are the answer tokens: every row's, once an epoch
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_chat)
    answers = sum(
        sum(row_tokens(tokenizer, row).trained) for row in reverse_rows(96, 0, "messages")
    )
    assert sum(r["targets"] for r in records) == 6 * answers


def test_predict_renders_the_saved_template_as_a_chat_pipeline_does(tmp_path, tiny_llama_chat):
    """`trainer predict` on an sft model takes a prompt as the user's turn and renders it with
    the template saved in final/; transformers.pipeline fed the same chat message answers
    the same (greedy), so final/ serves chat messages with the standard tools."""
    import transformers

    from trainer.inference import PredictOptions, Predictor

    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_rows(64, 0, "messages"))
    settings = {"train.epochs": 3, "data.chat_template": "chatml"}
    assert train(sft_config(tmp_path, tiny_llama_chat, train_file, **settings)) == 0
    final = str(tmp_path / "run" / "final")
    prompts = ["reverse: good day", "reverse: red"]
    ours = Predictor.load(final).predict(prompts, PredictOptions(max_new_tokens=6))
    chat = transformers.pipeline("text-generation", model=final)
    for prompt, row in zip(prompts, ours, strict=True):
        answer = chat([{"role": "user", "content": prompt}], max_new_tokens=6, do_sample=False)
        assert row["generated"] == answer[0]["generated_text"][-1]["content"]
