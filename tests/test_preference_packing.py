"""Packed preference pairs (data.packing with task preference): the pairs' sequences packed
into max_length rows, each once and attending to itself alone, in fewer positions; they
score each sequence as the padded batch does (eager and SDPA); a packed run trains as the
padded one (LoRA with the adapter off as reference, and full with precomputed scores); and
the config accepts packing for the tasks that pack examples only."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics, write_jsonl
from test_config import error_of, minimal
from test_preference import CHAT, _split, pair_rows, preference_config, train
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.config import DataConfig, build_config
from trainer.data.collate import PackedPairCollator, PairCollator
from trainer.data.encode import IGNORE_INDEX
from trainer.data.preference_encode import encode_pairs
from trainer.tasks.preference import pair_count
from trainer.tasks.preference_losses import sequence_logps

MAX_LENGTH = 48


@pytest.fixture(scope="module")
def pairs(tiny_llama_chat):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_chat)
    rows = [CHAT, *pair_rows(9, 4)]
    encoded = encode_pairs(_split(rows), tokenizer, DataConfig(max_length=MAX_LENGTH))
    return tokenizer, [encoded[i] for i in range(len(encoded))]


def test_every_sequence_is_packed_once_alone_in_max_length_rows(pairs):
    tokenizer, examples = pairs
    batch = PackedPairCollator(tokenizer.pad_token_id, MAX_LENGTH)(examples)
    padded = PairCollator(tokenizer.pad_token_id)(examples)
    assert batch["input_ids"].shape[1] <= MAX_LENGTH
    assert batch["input_ids"].numel() < padded["input_ids"].numel()
    assert pair_count(batch) == pair_count(padded) == len(examples)
    sequences = [e["input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
    index, ids = batch["sequence_index"], batch["input_ids"]
    for number, sequence in enumerate(sequences):
        here = index == number
        assert ids[here].tolist() == sequence  # whole, in order, once
        assert batch["position_ids"][here].tolist() == list(range(len(sequence)))
        first = here.nonzero()[0].tolist()
        assert batch["labels"][first[0], first[1]] == IGNORE_INDEX
    mask = batch["attention_mask"][:, 0]  # [rows, width, width], 0 where attention is allowed
    for row in range(index.shape[0]):
        for i in range(index.shape[1]):
            seen = (mask[row, i] == 0).nonzero().flatten()
            if index[row, i] >= 0:
                assert (index[row, seen] == index[row, i]).all() and seen.max() == i


@pytest.mark.parametrize("by_position", [False, True], ids=["4d-mask", "one-row"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_a_packed_batch_scores_each_sequence_as_the_padded_batch(
    pairs, tiny_llama_chat, attention, by_position
):
    """Rows under a block-diagonal mask, or (flash attention's inputs, which eager and SDPA
    isolate by the position ids too) one row without padding or mask."""
    tokenizer, examples = pairs
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_chat, attn_implementation=attention)
    model.eval()
    padded = PairCollator(tokenizer.pad_token_id)(examples)
    packed = PackedPairCollator(tokenizer.pad_token_id, MAX_LENGTH, by_position)(examples)
    assert ("attention_mask" in packed) != by_position
    # no key/value cache, as in training: transformers reads packing from the position ids
    # only without one
    inputs = ("input_ids", "attention_mask", "position_ids")
    with torch.no_grad():
        logits = model(**{k: v for k, v in padded.items() if k in inputs}, use_cache=False).logits
        expected, expected_tokens = sequence_logps(logits, padded["labels"])
        logits = model(**{k: v for k, v in packed.items() if k in inputs}, use_cache=False).logits
        found, tokens = sequence_logps(logits, packed["labels"], packed["sequence_index"])
    assert tokens.tolist() == expected_tokens.tolist()
    assert torch.allclose(found, expected, atol=1e-5, rtol=0)
    assert expected.std() > 1  # sequences of different scores, so an order mix-up would show


def _records(folder, model, train_file, valid_file, packing: str, **settings) -> list[dict]:
    argv = preference_config(
        folder, model, train_file,
        **{"data.packing": packing, "data.validation": str(valid_file), "eval.every_steps": 2,
           "train.max_steps": 4, "data.max_length": MAX_LENGTH, **settings})  # fmt: skip
    assert train(argv) == 0
    return read_metrics(folder / "run")


@pytest.mark.parametrize(
    "settings",
    [{"peft.method": "lora", "peft.dropout": 0.0}, {"preference.precompute_reference": "true"}],
    ids=["lora-adapter-off", "full-precomputed"],
)
def test_a_packed_run_trains_as_the_padded_one(tmp_path, tiny_llama_chat, settings):
    train_file = write_jsonl(tmp_path / "train.jsonl", pair_rows(32, 5))
    valid_file = write_jsonl(tmp_path / "valid.jsonl", pair_rows(6, 6))
    runs = {
        packing: _records(tmp_path / packing, tiny_llama_chat, train_file, valid_file, packing,
                          **settings)
        for packing in ("false", "true")
    }  # fmt: skip
    keys = ("loss", "grad_norm", "rewards/chosen", "rewards/margin", "logps/rejected", "targets")
    keys += ("eval_loss", "eval_rewards/accuracy", "eval_rewards/margin")
    for padded, packed in zip(runs["false"], runs["true"], strict=True):
        for key in keys:
            if key in padded:
                assert packed[key] == pytest.approx(padded[key], abs=1e-5), key
    windows = {p: [r for r in runs[p] if "loss" in r] for p in runs}
    assert len(windows["true"]) == 4 and windows["true"][-1]["rewards/margin"] != 0
    for padded, packed in zip(windows["false"], windows["true"], strict=True):
        assert packed["tokens"] == padded["tokens"]  # the same real tokens, other rows


def test_packing_is_for_the_tasks_that_pack_examples():
    data = {"train": "pairs.jsonl", "packing": True}
    cfg = build_config(minimal(task="preference", data=data), world_size=1)
    assert cfg.data.packing
    assert "data.packing: only for sft and preference" in error_of(minimal(data=data))


@pytest.mark.gpu
def test_flash_attention_scores_packed_pairs_as_the_padded_batch(pairs, tiny_llama_chat):
    """flash_attention_2 on one row of the pairs' sequences (its variable-length kernel,
    from the position ids) against the padded batch under SDPA, both bf16 on the GPU: the
    sums within bf16 rounding."""
    pytest.importorskip("flash_attn")
    tokenizer, examples = pairs
    padded = PairCollator(tokenizer.pad_token_id)(examples)
    packed = PackedPairCollator(tokenizer.pad_token_id, MAX_LENGTH, by_position=True)(examples)
    scores = {}
    for attention, batch in (("sdpa", padded), ("flash_attention_2", packed)):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_llama_chat, attn_implementation=attention, dtype=torch.bfloat16
        )
        model = model.to("cuda").eval()
        batch = {k: v.to("cuda") for k, v in batch.items()}
        inputs = {
            k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")
        }
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
        scores[attention] = sequence_logps(logits, batch["labels"], batch.get("sequence_index"))[
            0
        ].cpu()
    assert torch.allclose(scores["flash_attention_2"], scores["sdpa"], rtol=1e-2, atol=0.1)
