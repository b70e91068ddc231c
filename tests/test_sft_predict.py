"""`trainer predict` and `trainer export --merge` on sft runs: conversations or plain prompts
rendered by the saved chat template and answered up to EOS / end of turn; bad conversation
rows in one line; a merged LoRA folder that is the adapter model, template included."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import reset_accelerate
from test_sft import sft_config, train, write_jsonl
from tiny_models import WORDS
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.cli import main
from trainer.data.chat_templates import CHATML, LLAMA3, stop_token_ids

ANSWER = "bad night"  # every training answer: a rule the 2-layer model learns in 4 epochs
MAX_NEW = 20


def constant_answer_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(rng.sample(WORDS, 3))},
                {"role": "assistant", "content": ANSWER},
            ]
        }
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def sft_final(tmp_path_factory, tiny_llama_chat):
    """final/ of a full sft run that answers ANSWER and then ends its turn."""
    folder = tmp_path_factory.mktemp("sft-predict")
    train_file = write_jsonl(folder / "train.jsonl", constant_answer_rows(64, 0))
    settings = {"train.epochs": 4, "train.lr": 1e-2}
    assert train(sft_config(folder, tiny_llama_chat, train_file, **settings)) == 0
    return folder / "run" / "final"


def predict(*argv) -> int:
    reset_accelerate()
    return main(["predict", *map(str, argv)])


def reference_answer(final, turns: list[dict]) -> tuple[str, list[int]]:
    """transformers alone: the template's generation prompt, greedy decoding that does not
    stop; the answer is what comes before the first EOS, and the raw continuation."""
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    prompt = tokenizer.apply_chat_template(
        turns, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None)
    new = out[0, prompt["input_ids"].shape[1] :].tolist()
    stop = new.index(tokenizer.eos_token_id)
    return tokenizer.decode(new[:stop]), new


def test_messages_rows_and_plain_prompts_are_answered_up_to_the_end_of_turn(
    sft_final, tmp_path, capsys
):
    conversations = [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "good day"}],
        [
            {"role": "user", "content": "red"},
            {"role": "assistant", "content": ANSWER},
            {"role": "user", "content": "blue sky"},
        ],
    ]
    rows = [
        {"id": "a", "messages": conversations[0]},
        {"text": "red blue"},
        {"messages": conversations[1]},
    ]
    source, target = write_jsonl(tmp_path / "asked.jsonl", rows), tmp_path / "answers.jsonl"
    assert (
        predict(sft_final, "--input", source, "--output", target, "--max-new-tokens", MAX_NEW) == 0
    )
    answers = [json.loads(line) for line in target.read_text().splitlines()]
    assert answers == [
        {"id": "a", "messages": conversations[0], "generated": ANSWER},
        {"text": "red blue", "generated": ANSWER},
        {"messages": conversations[1], "generated": ANSWER},
    ]
    # the same as transformers' own rendering and decoding, cut at the first EOS; without
    # the stop the model goes on (a new turn after <|im_end|>), so the stop is what ended it
    plain = [{"role": "user", "content": "red blue"}]
    for turns, row in zip([conversations[0], plain, conversations[1]], answers, strict=True):
        expected, continuation = reference_answer(sft_final, turns)
        assert row["generated"] == expected
        assert len(continuation) == MAX_NEW and continuation.index(2) < MAX_NEW - 1


def test_a_txt_file_is_one_prompt_per_line(sft_final, tmp_path):
    source, target = tmp_path / "asked.txt", tmp_path / "answers.jsonl"
    source.write_text("good day\n\nred blue\n")
    assert predict(sft_final, "--input", source, "--output", target) == 0
    answers = [json.loads(line) for line in target.read_text().splitlines()]
    assert answers == [
        {"id": 1, "text": "good day", "generated": ANSWER},
        {"id": 3, "text": "red blue", "generated": ANSWER},
    ]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"messages": "hello"}, "'messages' must be a list of {role, content} messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "x"},
                ]
            },
            "'messages' must end with a user turn",
        ),
        ({"messages": []}, "'messages' must end with a user turn"),
        ({"messages": [{"role": "user"}]}, "message 1 needs a role and a content"),
    ],
)
def test_a_bad_conversation_row_is_one_line_naming_the_file_and_row(
    sft_final, tmp_path, capsys, bad, message
):
    good = {"messages": [{"role": "user", "content": "good day"}]}
    source = write_jsonl(tmp_path / "asked.jsonl", [good, bad])
    target = tmp_path / "answers.jsonl"
    assert predict(sft_final, "--input", source, "--output", target) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --input: asked.jsonl line 2: ")
    assert message in err[0]
    assert not target.exists()


def test_messages_need_a_template_a_pair_trained_model_lacks(tmp_path, tiny_gpt2, capsys):
    """Prompt/completion rows train without a template; such a model answers plain prompts
    and says in one line that it cannot render conversations."""
    rows = [{"prompt": f"{w} ->", "completion": " " + ANSWER} for w in WORDS[:16]]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    assert train(sft_config(tmp_path, tiny_gpt2, train_file, **{"train.max_steps": 1})) == 0
    final = tmp_path / "run" / "final"
    capsys.readouterr()
    source = write_jsonl(
        tmp_path / "asked.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]
    )
    assert predict(final, "--input", source, "--output", tmp_path / "out.jsonl") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chat messages need a chat template" in err[0]
    source = write_jsonl(tmp_path / "plain.jsonl", [{"text": "good ->"}])
    assert predict(final, "--input", source, "--output", tmp_path / "out.jsonl") == 0


def test_generation_stops_at_the_templates_end_of_turn_when_it_is_not_eos(tiny_gpt2):
    """Llama 3's base tokenizer ends text with its EOS, and a turn with <|eot_id|>."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|im_end|>"]})
    eot, im_end = tokenizer.convert_tokens_to_ids(["<|eot_id|>", "<|im_end|>"])
    tokenizer.chat_template = LLAMA3
    assert stop_token_ids(tokenizer, None) == sorted([tokenizer.eos_token_id, eot])
    tokenizer.chat_template = CHATML
    assert stop_token_ids(tokenizer, [7, tokenizer.eos_token_id]) == sorted(
        [7, tokenizer.eos_token_id, im_end]
    )
    tokenizer.chat_template = None  # a pair-trained model: EOS only
    assert stop_token_ids(tokenizer, None) == [tokenizer.eos_token_id]


# --- export --merge ------------------------------------------------------------------------


def test_a_merged_lora_export_is_the_adapter_model_with_its_template(
    tmp_path, tiny_llama_chat, capsys
):
    from peft import PeftModel

    train_file = write_jsonl(tmp_path / "train.jsonl", constant_answer_rows(32, 1))
    settings = {"peft.method": "lora", "train.lr": 3e-2, "train.max_steps": 4}
    assert train(sft_config(tmp_path, tiny_llama_chat, train_file, **settings)) == 0
    run, merged = tmp_path / "run", tmp_path / "merged"
    reset_accelerate()
    assert main(["export", str(run), "--merge", "--out", str(merged)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["merged"] and summary["task"] == "sft"
    assert not (merged / "adapter_config.json").exists()

    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(run / "final").chat_template
    assert "<|im_start|>" in tokenizer.chat_template
    conversations = [c["messages"] for c in constant_answer_rows(4, 2)]
    batch = tokenizer.apply_chat_template(
        conversations, padding=True, return_tensors="pt", return_dict=True
    )
    standalone = AutoModelForCausalLM.from_pretrained(merged).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_chat)
    adapted = PeftModel.from_pretrained(base, run / "final").eval()
    with torch.no_grad():
        ours, theirs = standalone(**batch).logits, adapted(**batch).logits
        with adapted.disable_adapter():
            plain = adapted(**batch).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert (ours - plain).abs().max() > 1e-3  # the adapter was trained: merging changed it
