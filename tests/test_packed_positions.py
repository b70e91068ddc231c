"""Packed examples as flash attention's variable-length path takes them
(data/collate.py `packs_by_position`): one row of the micro-batch's tokens, position ids
restarting in each example, no attention mask.

transformers 5.24 builds the block-diagonal causal mask from such position ids for eager
and SDPA attention too (masking_utils.find_packed_sequence_indices, when the attention
mask is None and there is no cache), so on the CPU the very inputs flash attention gets
must give every example the loss that the 4-D mask gives it. On a GPU with flash-attn
installed, flash attention on them must give each example the loss it has alone."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics
from test_sft import reverse_rows, sft_config, train, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainer.config import DataConfig
from trainer.data.chat_encode import encode_chat
from trainer.data.collate import (
    CausalLMCollator,
    PackedExamplesCollator,
    PaddingCollator,
    packs_by_position,
)
from trainer.data.encode import IGNORE_INDEX
from trainer.data.read import Split
from trainer.run.forward import forward
from trainer.run.step import real_tokens
from trainer.tasks.losses import count_targets

needs_flash_attn = pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn (pip flash-attn)"
)


@pytest.mark.parametrize(
    ("attention", "by_position"),
    [
        ("flash_attention_2", True),
        ("flash_attention_3", True),
        ("kernels-community/flash-attn2", True),
        ("sdpa", False),
        ("eager", False),
        ("flex_attention", False),
        (None, False),  # unset: transformers' SDPA
    ],
)
def test_only_flash_attention_packs_by_position(attention, by_position):
    assert packs_by_position(attention) is by_position


def _examples(tokenizer, on_prompt: bool) -> tuple[list[dict], list[dict]]:
    """(packed rows, the same examples one per row) of 24 chat rows."""
    rows = reverse_rows(24, 11, "messages")
    split = Split("data.train", rows, [f"row {i}" for i in range(len(rows))])
    settings = {"max_length": 96, "train_on_prompt": on_prompt}
    packed = list(encode_chat(split, tokenizer, DataConfig(packing=True, **settings)))
    alone = list(encode_chat(split, tokenizer, DataConfig(**settings)))
    assert len(packed) < len(alone) // 2  # several examples share a row
    return packed, alone


def example_losses(model, batch: dict, lengths: list[list[int]]) -> dict[tuple, float]:
    """Each example's summed next-token loss, by its token ids, through the training
    forward (no key/value cache: transformers reads packing from position ids only
    without one); `lengths`: those of the examples end to end from each row's start."""
    with torch.no_grad():
        logits = forward(model, batch, targets_only=False)[0].logits.float()
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    per_token = F.cross_entropy(
        logits.transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none"
    )
    losses = {}
    for row, row_lengths in enumerate(lengths):
        start = 0
        for length in row_lengths:
            ids = tuple(batch["input_ids"][row, start : start + length].tolist())
            losses[ids] = per_token[row, start : start + length].sum().item()
            start += length
    return losses


def test_one_row_holds_every_token_with_positions_restarting(tiny_llama_chat):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_chat)
    packed, alone = _examples(tokenizer, on_prompt=True)
    masked = PackedExamplesCollator(tokenizer.pad_token_id)(packed)
    row = PackedExamplesCollator(tokenizer.pad_token_id, by_position=True)(packed)
    total = sum(len(e["input_ids"]) for e in alone)
    assert set(row) == {"input_ids", "labels", "position_ids", "real_mask"}  # no mask
    assert row["input_ids"].shape == (1, total) and masked["input_ids"].shape[0] == len(packed)
    lengths = [n for e in packed for n in e["example_lengths"]]
    assert row["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    real = masked["real_mask"].bool()
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(row[key][0], masked[key][real])
    assert real_tokens(row) == real_tokens(masked) == total  # no padding, none counted
    assert count_targets(row["labels"], shifted=True) == count_targets(masked["labels"], True)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("on_prompt", [False, True])
def test_position_ids_alone_give_the_masked_losses(tiny_llama_chat, attention, on_prompt):
    """The inputs flash attention gets, on eager/SDPA: transformers rebuilds the
    block-diagonal mask from the position ids, so each example's loss is the one it has
    under the collator's 4-D mask (and so alone: tests/test_sft.py)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_chat)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_chat, attn_implementation=attention)
    packed, _ = _examples(tokenizer, on_prompt)
    masked = PackedExamplesCollator(tokenizer.pad_token_id)(packed)
    row = PackedExamplesCollator(tokenizer.pad_token_id, by_position=True)(packed)
    per_row = [e["example_lengths"] for e in packed]
    flat = [[n for lengths in per_row for n in lengths]]
    expected = example_losses(model, masked, per_row)
    got = example_losses(model, row, flat)
    assert got.keys() == expected.keys() and len(got) == 24
    assert [got[k] for k in expected] == pytest.approx(list(expected.values()), abs=1e-5)
    # without its position ids the row is one sequence, whose examples see each other
    leaky = example_losses(model, {**row, "position_ids": None}, flat)
    assert max(abs(leaky[k] - expected[k]) for k in expected) > 1e-2


def test_isolated_clm_blocks_as_one_row_keep_their_losses(tiny_gpt2):
    """data.isolate_documents for CLM under flash attention: the blocks end to end, no
    block's first token a target of the block before; on SDPA the same per-token losses
    and targets as under the 4-D mask."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, attn_implementation="sdpa").eval()
    eos = tokenizer.eos_token_id
    texts = ["the film was great and long", "a boring day in Paris", "Alice works for Acme"]
    stream = [i for text in texts for i in [*tokenizer(text)["input_ids"], eos]]
    blocks = [{"input_ids": stream[i : i + 8]} for i in range(0, len(stream) - 7, 8)]
    masked = CausalLMCollator(eos)(blocks)
    row = CausalLMCollator(eos, by_position=True)(blocks)
    assert "attention_mask" not in row and row["input_ids"].shape == (1, 8 * len(blocks))
    assert torch.equal(row["position_ids"], masked["position_ids"].reshape(1, -1))
    assert count_targets(row["labels"], True) == count_targets(masked["labels"], True)
    with torch.no_grad():
        by_mask = forward(model, masked, targets_only=False)[0].logits
        by_position = forward(model, row, targets_only=False)[0].logits
    assert torch.allclose(by_position.reshape(by_mask.shape), by_mask, atol=1e-5)


def example_logits(model, batch: dict, lengths: list[int]) -> dict[tuple, torch.Tensor]:
    """Each example's logits, by its token ids, from a one-row batch whose examples have
    `lengths`, end to end."""
    with torch.no_grad():
        logits = forward(model, batch, targets_only=False)[0].logits.float()[0]
    found, start = {}, 0
    for length in lengths:
        ids = tuple(batch["input_ids"][0, start : start + length].tolist())
        found[ids] = logits[start : start + length]
        start += length
    return found


@pytest.mark.parametrize(
    ("attention", "device"),
    [
        ("sdpa", "cpu"),  # the same inputs, masked by transformers from the position ids
        pytest.param("flash_attention_2", "cuda", marks=[pytest.mark.gpu, needs_flash_attn]),
    ],
)
def test_flash_attention_gives_a_packed_example_its_loss_alone(tiny_llama_chat, attention, device):
    """flash_attention_2 on one row of packed examples (its variable-length kernel, from
    the position ids) against each example alone through flash attention, in bf16: the
    logits within bf16 rounding (2e-3 on the CPU with SDPA; a leak moves them by 0.3),
    and so the losses."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_chat)
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_chat, attn_implementation=attention, dtype=torch.bfloat16
    )
    model = model.to(device).eval()
    packed, alone = _examples(tokenizer, on_prompt=True)
    row = PackedExamplesCollator(tokenizer.pad_token_id, by_position=True)(packed)
    row = {key: value.to(device) for key, value in row.items()}
    lengths = [n for e in packed for n in e["example_lengths"]]
    together = example_losses(model, row, [lengths])
    single, single_logits = {}, {}
    for example in alone:
        batch = PaddingCollator(tokenizer.pad_token_id)([example])
        batch = {k: v.to(device) for k, v in batch.items() if k != "attention_mask"}
        single |= example_losses(model, batch, [[len(example["input_ids"])]])
        single_logits |= example_logits(model, batch, [len(example["input_ids"])])
    assert together.keys() == single.keys() and len(single) == 24
    assert [together[k] for k in single] == pytest.approx(list(single.values()), rel=1e-2)
    packed_logits = example_logits(model, row, lengths)
    leaky_logits = example_logits(model, {**row, "position_ids": None}, lengths)
    apart = max((packed_logits[k] - single_logits[k]).abs().max().item() for k in single)
    leak = max((leaky_logits[k] - single_logits[k]).abs().max().item() for k in single)
    assert apart <= 2e-2 < 0.1 <= leak  # as one sequence, the examples see each other


def test_a_packed_run_on_one_row_trains_as_under_the_mask(tmp_path, tiny_llama_chat, monkeypatch):
    """The training loop on the batches flash attention would get (forced here on SDPA):
    the same losses, step by step and at evaluation, as under the 4-D mask, the same
    tokens, and no padding."""
    rows = write_jsonl(tmp_path / "train.jsonl", reverse_rows(64, 5, "messages"))
    settings = {
        "data.packing": "true",
        "data.max_length": 96,
        "data.validation_split": 0.25,
        "train.epochs": 2,
        "train.micro_batch_size": 4,
    }
    assert train(sft_config(tmp_path / "masked", tiny_llama_chat, rows, **settings)) == 0
    monkeypatch.setattr("trainer.data.collate.packs_by_position", lambda attention: True)
    assert train(sft_config(tmp_path / "row", tiny_llama_chat, rows, **settings)) == 0
    masked, row = (read_metrics(tmp_path / name / "run") for name in ("masked", "row"))
    for key in ("loss", "eval_loss"):
        expected = [r[key] for r in masked if key in r]
        assert expected and [r[key] for r in row if key in r] == pytest.approx(expected, rel=1e-5)
    assert [r["tokens"] for r in row if "tokens" in r] == [
        r["tokens"] for r in masked if "tokens" in r
    ]
    assert {r["pad_fraction"] for r in row if "pad_fraction" in r} == {0.0}
    assert max(r["pad_fraction"] for r in masked if "pad_fraction" in r) > 0
