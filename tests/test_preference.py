"""Preference tuning: the pair rows and their bad-row lines, answer-only targets shared
prompt, the chosen-then-rejected batch, the reference (adapter off, frozen copy, none),
loss per pair over the accumulation window, and the logged and evaluated rewards."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from conftest import read_metrics, reset_accelerate, write_jsonl
from tiny_models import WORDS
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.cli import main
from trainer.config import DataConfig, PreferenceConfig, RunConfig
from trainer.data.collate import PairCollator
from trainer.data.encode import IGNORE_INDEX
from trainer.data.preference_encode import encode_pairs, pair_tokens
from trainer.data.preference_rows import preference_row
from trainer.data.read import Split
from trainer.errors import UserError
from trainer.tasks.preference import make_objective
from trainer.tasks.preference_losses import sequence_logps

CHAT = {
    "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red blue"}],
    "chosen": [{"role": "assistant", "content": "blue red"}],
    "rejected": [{"role": "assistant", "content": "red"}],
}


def pair_rows(count: int, seed: int) -> list[dict]:
    """Prompts of words; the chosen answer reverses them, the rejected one keeps them."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = rng.sample(WORDS, rng.randint(2, 4))
        rows.append(
            {
                "prompt": "reverse: " + " ".join(words) + " ->",
                "chosen": " " + " ".join(reversed(words)),
                "rejected": " " + " ".join(words),
            }
        )
    return rows


def preference_config(tmp_path, model, train_file, **sections) -> list[str]:
    settings = {
        "output_dir": str(tmp_path / "run"),
        "model.name_or_path": str(model),
        "data.train": str(train_file),
        "data.max_length": 64,
        "data.cache_dir": str(tmp_path / "cache"),
        "train.epochs": 1,
        "train.global_batch_size": 8,
        "train.micro_batch_size": 4,
        "train.lr": 1e-3,
        "train.warmup_ratio": 0.0,
        "log.every_steps": 1,
        "log.trackers": "[]",
    } | sections
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = tmp_path / "preference.yaml"
    config.write_text("task: preference\n")
    return [str(config), *(f"{k}={v}" for k, v in settings.items())]


def train(argv: list[str]) -> int:
    reset_accelerate()
    return main(["train", *argv])


@pytest.fixture
def chat_tokenizer(tiny_llama_chat):
    return AutoTokenizer.from_pretrained(tiny_llama_chat)


def answer_text(tokenizer, tokens) -> str:
    return tokenizer.decode([i for i, on in zip(tokens.ids, tokens.trained, strict=True) if on])


# --- rows ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"prompt": "a", "chosen": "b"}, "row 3: missing column 'rejected'"),
        ({"prompt": "a", "chosen": "b", "rejected": "b"}, "row 3: the chosen answer is identical"),
        (
            {"prompt": "a", "chosen": "  ", "rejected": "c"},
            "row 3: empty answer in column 'chosen'",
        ),
        (
            {"prompt": "a", "chosen": [{"role": "user", "content": "x"}], "rejected": "c"},
            "row 3: 'chosen' must hold assistant turns only",
        ),
        (
            {"prompt": "a", "chosen": "b", "rejected": [{"role": "assistant", "content": "c"}]},
            "row 3: chosen and rejected must both be text or both messages",
        ),
    ],
)
def test_a_bad_row_is_one_line_naming_it(row, message):
    with pytest.raises(UserError) as err:
        preference_row(row, "pairs.jsonl row 3", DataConfig())
    assert str(err.value).startswith(f"pairs.jsonl {message}") and "\n" not in str(err.value)


def test_column_names_are_configurable_and_a_text_prompt_becomes_the_users_turn():
    cfg = DataConfig(prompt_column="q", chosen_column="good", rejected_column="bad")
    row = {"q": "hi", "good": [{"role": "assistant", "content": "hello"}], "bad": CHAT["rejected"]}
    checked = preference_row(row, "f row 1", cfg)
    assert checked["prompt"] == [{"role": "user", "content": "hi"}]
    with pytest.raises(UserError, match=r"missing column 'good'.*set data\.chosen_column"):
        preference_row({"q": "hi", "bad": "x"}, "f row 1", cfg)


# --- tokens -------------------------------------------------------------------------------


def test_chosen_and_rejected_share_the_prompt_and_train_on_their_answer_only(chat_tokenizer):
    chosen, rejected = pair_tokens(chat_tokenizer, CHAT)
    assert answer_text(chat_tokenizer, chosen) == "blue red<|im_end|>\n"
    assert answer_text(chat_tokenizer, rejected) == "red<|im_end|>\n"
    start = chosen.trained.index(True)
    assert chosen.ids[:start] == rejected.ids[:start]  # one prompt
    text = pair_tokens(chat_tokenizer, {"prompt": "good day ->", "chosen": " x", "rejected": " y"})
    assert [answer_text(chat_tokenizer, side) for side in text] == [" x<|im_end|>", " y<|im_end|>"]


def test_an_assistant_turn_in_the_prompt_is_no_target(chat_tokenizer):
    prompt = [
        *CHAT["prompt"],
        {"role": "assistant", "content": "old"},
        {"role": "user", "content": "again"},
    ]
    chosen, _ = pair_tokens(chat_tokenizer, {**CHAT, "prompt": prompt})
    assert answer_text(chat_tokenizer, chosen) == "blue red<|im_end|>\n"


def _split(rows):
    return Split("data.train", rows, [f"pairs.jsonl row {i + 1}" for i in range(len(rows))])


def test_a_long_pair_loses_the_same_prompt_start_on_both_sides_or_is_refused(chat_tokenizer):
    long_prompt = {**CHAT, "prompt": [{"role": "user", "content": " ".join(WORDS)}]}
    full = pair_tokens(chat_tokenizer, long_prompt)
    limit = max(len(side.ids) for side in full) - 10
    encoded = encode_pairs(_split([long_prompt]), chat_tokenizer, DataConfig(max_length=limit))
    chosen, rejected = encoded[0]["input_ids"], encoded[0]["rejected_input_ids"]
    assert max(len(chosen), len(rejected)) == limit
    assert chosen == full[0].ids[10:] and rejected == full[1].ids[10:]
    dropped = encode_pairs(
        _split([long_prompt, CHAT]), chat_tokenizer, DataConfig(max_length=limit, truncation="drop")
    )
    assert len(dropped) == 1
    with pytest.raises(UserError, match=r"pairs.jsonl row 1: the answers alone are longer than "):
        encode_pairs(_split([CHAT]), chat_tokenizer, DataConfig(max_length=3))


def test_the_batch_holds_the_chosen_rows_then_the_rejected_rows(chat_tokenizer):
    encoded = encode_pairs(_split([CHAT, pair_rows(1, 0)[0]]), chat_tokenizer, DataConfig())
    batch = PairCollator(chat_tokenizer.pad_token_id)([encoded[0], encoded[1]])
    assert batch["input_ids"].shape[0] == 4
    for row, (key, index) in enumerate(
        [("input_ids", 0), ("input_ids", 1), ("rejected_input_ids", 0), ("rejected_input_ids", 1)]
    ):
        ids = encoded[index][key]
        assert batch["input_ids"][row, : len(ids)].tolist() == ids
        assert batch["attention_mask"][row].sum() == len(ids)
        assert (batch["labels"][row, len(ids) :] == IGNORE_INDEX).all()


# --- the reference ------------------------------------------------------------------------


def _cfg(**preference) -> RunConfig:
    return RunConfig(task="preference", preference=PreferenceConfig(**preference))


def test_full_fine_tuning_holds_a_frozen_copy_and_reference_free_objectives_none(tiny_llama_chat):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_chat)
    objective = make_objective(_cfg(), model, torch.device("cpu"), sharded=False, data=None)
    reference = objective.reference
    assert reference is not model and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert all(
        torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters(), strict=True)
    )
    for loss in ("simpo", "orpo"):
        free = make_objective(_cfg(loss=loss), model, torch.device("cpu"), sharded=False, data=None)
        assert free.reference is None and not free.adapter_off
    with pytest.raises(UserError) as err:  # sharded: the copy would not be
        make_objective(_cfg(), model, torch.device("cpu"), sharded=True, data=None)
    assert str(err.value).startswith("preference.loss: dpo in full fine-tuning under ZeRO-3/FSDP")
    assert "set preference.precompute_reference: true" in str(err.value)


def test_under_lora_the_reference_is_the_base_with_the_adapter_off(tiny_llama_chat, chat_tokenizer):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_chat)
    expected_model = AutoModelForCausalLM.from_pretrained(tiny_llama_chat)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    cfg = _cfg()
    cfg.peft.method = "lora"
    objective = make_objective(cfg, model, torch.device("cpu"), sharded=False, data=None)
    assert objective.reference is None and objective.adapter_off
    encoded = encode_pairs(_split([CHAT]), chat_tokenizer, DataConfig())
    batch = PairCollator(chat_tokenizer.pad_token_id)([encoded[0]])
    with torch.no_grad():
        expected = sequence_logps(
            expected_model(input_ids=batch["input_ids"]).logits, batch["labels"]
        )[0]
        policy = sequence_logps(model(input_ids=batch["input_ids"]).logits, batch["labels"])[0]
    assert torch.allclose(objective.reference_logps(model, batch), expected, atol=1e-6)
    assert not torch.allclose(policy, expected, atol=1e-3)  # the adapter does change the policy


# --- runs ---------------------------------------------------------------------------------


def test_config_rejects_bad_preference_values(tmp_path):
    from trainer.config import build_config

    raw = {"task": "preference", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    raw["preference"] = {"loss": "kto", "beta": 0, "label_smoothing": 0.5, "orpo_lambda": -1}
    with pytest.raises(UserError) as err:
        build_config(raw, for_training=False)
    message = str(err.value)
    for part in ("preference.loss: 'kto' is not one of dpo, ipo, simpo, orpo",
                 "preference.beta: must be > 0", "preference.label_smoothing: must be in [0, 0.5)",
                 "preference.orpo_lambda: must be >= 0"):  # fmt: skip
        assert part in message


def test_a_bad_row_stops_the_run_with_one_error_line(tmp_path, tiny_llama_chat, capsys):
    rows = pair_rows(4, 0)
    rows[1]["rejected"] = rows[1]["chosen"]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    assert train(preference_config(tmp_path, tiny_llama_chat, train_file)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: data.train: train.jsonl line 2: the chosen answer is identical to the rejected one"
    ]


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo", "orpo"])
def test_each_objective_trains_and_logs_its_rewards(tmp_path, tiny_llama_chat, loss):
    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(32, 0))
    valid_file = write_jsonl(tmp_path / "valid.jsonl", pair_rows(8, 1))
    argv = preference_config(
        tmp_path, tiny_llama_chat, train_file, **{"preference.loss": loss,
        "data.validation": str(valid_file), "train.epochs": 2})  # fmt: skip
    assert train(argv) == 0
    records = read_metrics(tmp_path / "run")
    steps = [r for r in records if "loss" in r]
    names = ("rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
             "logps/chosen", "logps/rejected")  # fmt: skip
    for record in steps:
        assert all(math.isfinite(record[name]) for name in names)
        margin = record["rewards/chosen"] - record["rewards/rejected"]
        assert record["rewards/margin"] == pytest.approx(margin, abs=1e-5)
    if loss in ("dpo", "ipo"):  # the first step's policy is the reference
        assert steps[0]["rewards/chosen"] == 0.0 and steps[0]["rewards/margin"] == 0.0
    if loss == "dpo":
        assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    evaluation = [r for r in records if "eval_loss" in r][-1]
    assert all(f"eval_{name}" in evaluation for name in names)
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert 0.0 <= results["rewards/accuracy"] <= 1.0


def test_the_loss_is_per_pair_over_the_window_whatever_the_micro_batches(tmp_path, tiny_llama_chat):
    """8 pairs as 1 x 8 or 4 x 2 micro-batches: the same loss, rewards and gradient norm
    (pairs of different lengths, so a mean per micro-batch would differ)."""
    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(8, 2))
    runs = {}
    for micro in (8, 2):
        argv = preference_config(
            tmp_path / str(micro), tiny_llama_chat, train_file,
            **{"train.max_steps": 2, "train.micro_batch_size": micro})  # fmt: skip
        assert train(argv) == 0
        runs[micro] = [r for r in read_metrics(tmp_path / str(micro) / "run") if "loss" in r]
    for one, other in zip(runs[8], runs[2], strict=True):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margin", "logps/rejected"):
            assert one[key] == pytest.approx(other[key], abs=1e-5), key
    assert runs[8][1]["rewards/margin"] != 0.0


def test_a_stopped_run_resumes_exactly(tmp_path, tiny_llama_chat):
    """Stopped after step 4 (a checkpoint), the log every 3 steps: the rewards summed but
    not yet logged at the stop travel in the checkpoint, and the frozen reference is the
    initial model again, not the checkpoint's. The resumed run's log and weights are the
    uninterrupted run's."""
    from interrupted_runs import comparable, final_weights, stop_in_process

    from trainer.run.stop import EXIT_PREEMPTED

    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(24, 4))
    settings = {"train.max_steps": 6, "log.every_steps": 3, "checkpoint.every_steps": 2}
    runs = {}
    for name in ("whole", "cut"):
        runs[name] = preference_config(tmp_path / name, tiny_llama_chat, train_file, **settings)
    assert train(runs["whole"]) == 0
    assert stop_in_process(runs["cut"][0], 4, *runs["cut"][1:]) == EXIT_PREEMPTED
    assert train(runs["cut"]) == 0
    whole, cut = tmp_path / "whole" / "run", tmp_path / "cut" / "run"
    assert comparable(cut) == comparable(whole)
    assert [r["step"] for r in comparable(cut)] == [3, 6]
    weights = final_weights(cut)
    assert all(torch.equal(weights[k], v) for k, v in final_weights(whole).items())


@pytest.mark.slow
def test_one_and_two_processes_train_the_same_pairs_alike(tmp_path, tiny_llama_chat):
    """Global batch 8 as 1 x (2 x 4) or 2 x (2 x 2) (gloo DDP on CPU): the same loss,
    rewards and gradient norm at every step, the same evaluation, the same weights."""
    from interrupted_runs import cli, final_weights

    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(24, 5))
    valid_file = write_jsonl(tmp_path / "valid.jsonl", pair_rows(7, 6))  # uneven over 2
    settings = {"train.max_steps": 4, "train.micro_batch_size": 2, "eval.every_steps": 4,
                "data.validation": str(valid_file)}  # fmt: skip
    records = {}
    for processes in (1, 2):
        argv = preference_config(tmp_path / str(processes), tiny_llama_chat, train_file, **settings)
        command = ("train",) if processes == 1 else ("launch",)
        extra = () if processes == 1 else ("--cluster", "cpu-2proc")
        assert cli(*command, argv[0], *extra, *argv[1:]) == 0
        records[processes] = read_metrics(tmp_path / str(processes) / "run")
    keys = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracy",
            "eval_loss", "eval_rewards/margin", "eval_logps/chosen")  # fmt: skip
    for one, two in zip(records[1], records[2], strict=True):
        for key in keys:
            if key in one:
                assert one[key] == pytest.approx(two[key], abs=1e-5), key
    one, two = (final_weights(tmp_path / str(n) / "run") for n in (1, 2))
    assert all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)


def test_a_lora_run_exports_merged_as_the_adapter_scores(tmp_path, tiny_llama_chat, chat_tokenizer):
    """`trainer export --merge` of a preference LoRA run: a plain causal LM whose answer
    log-probabilities are the adapter's, not the base's (the run did move them)."""
    from interrupted_runs import cli

    from trainer.config import PeftConfig
    from trainer.model.saved import SavedModel
    from trainer.tasks.preference import PREFERENCE_TASK

    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(16, 7))
    argv = preference_config(
        tmp_path, tiny_llama_chat, train_file, **{"peft.method": "lora", "train.max_steps": 4}
    )
    assert train(argv) == 0
    final, merged_dir = tmp_path / "run" / "final", tmp_path / "merged"
    assert cli("export", tmp_path / "run", "--merge", "--out", merged_dir) == 0
    # scores are against the starting model, which a saved folder lacks: one line, exit 2
    assert cli("evaluate", final, "--data", train_file) == 2
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    adapted = SavedModel.read(final).load(
        PREFERENCE_TASK, chat_tokenizer, PeftConfig(method="lora"), "no", seed=0
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_chat)
    encoded = encode_pairs(_split(pair_rows(4, 8)), chat_tokenizer, DataConfig())
    batch = PairCollator(chat_tokenizer.pad_token_id)([encoded[i] for i in range(4)])

    def logps(model):
        with torch.no_grad():
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            return sequence_logps(model.eval()(**inputs).logits, batch["labels"])[0]

    assert torch.allclose(logps(merged), logps(adapted), atol=1e-4)
    assert not torch.allclose(logps(merged), logps(base), atol=1e-3)


def test_precomputed_reference_scores_train_as_the_frozen_copy_does(tmp_path, tiny_llama_chat):
    """preference.precompute_reference: one pass of the initial model over the pairs
    before training, then no second model; the log (loss, rewards, evaluation) is the
    frozen copy's."""
    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(16, 9))
    valid_file = write_jsonl(tmp_path / "valid.jsonl", pair_rows(5, 10))
    settings = {"train.max_steps": 4, "data.validation": str(valid_file), "eval.every_steps": 2}
    records = {}
    for precompute in ("false", "true"):
        argv = preference_config(
            tmp_path / precompute, tiny_llama_chat, train_file,
            **settings, **{"preference.precompute_reference": precompute})  # fmt: skip
        assert train(argv) == 0
        records[precompute] = read_metrics(tmp_path / precompute / "run")
    keys = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "eval_rewards/margin")
    for copy, scores in zip(records["false"], records["true"], strict=True):
        for key in keys:
            if key in copy:
                assert copy[key] == pytest.approx(scores[key], abs=1e-6), key
    assert records["true"][-1]["eval_rewards/margin"] != 0.0


def test_precompute_reference_is_refused_where_there_is_no_copy_to_replace():
    from trainer.config import build_config

    raw = {"task": "preference", "model": {"name_or_path": "m"}, "data": {"train": "t.jsonl"}}
    for extra in ({"peft": {"method": "lora"}}, {"preference": {"loss": "simpo"}}):
        preference = {"precompute_reference": True, **extra.get("preference", {})}
        with pytest.raises(UserError, match=r"preference\.precompute_reference: replaces"):
            build_config({**raw, **extra, "preference": preference}, for_training=True)
