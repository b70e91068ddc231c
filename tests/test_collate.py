"""trainer.data.collate: BERT masking statistics, whole-word masking, per-example determinism."""

from __future__ import annotations

import pytest
import tiny_models
import torch

from trainer.config import MlmConfig
from trainer.data.collate import (
    CausalLMCollator,
    MaskedLMCollator,
    PaddingCollator,
    example_seed,
)
from trainer.data.encode import IGNORE_INDEX, pack_for_mlm
from trainer.data.read import Split
from trainer.data.sampling import KeyedDataset

BLOCKS, LENGTH, RUN_SEED = 200, 128, 42


@pytest.fixture(scope="module")
def blocks(bert_tokenizer):
    """At least 200 packed blocks of 128 tokens from the tiny vocabulary."""
    texts = tiny_models.corpus(2400, seed=7)
    split = Split("data.train", [{"text": t} for t in texts], ["?"] * len(texts))
    packed = pack_for_mlm(split, bert_tokenizer, LENGTH)
    assert len(packed) >= BLOCKS
    return packed.select(range(BLOCKS))


def masked(blocks, tokenizer, settings: MlmConfig, epoch: int = 0):
    """Mask every block as the training loop would (keyed by epoch and index)."""
    keyed = KeyedDataset(blocks, RUN_SEED)
    batch = MaskedLMCollator(tokenizer, settings)([keyed[(epoch, i)] for i in range(len(blocks))])
    original = torch.tensor(blocks["input_ids"])
    special = torch.tensor(blocks["special_tokens_mask"], dtype=torch.bool)
    return batch, original, special


def test_bert_masking_statistics(blocks, bert_tokenizer):
    batch, original, special = masked(blocks, bert_tokenizer, MlmConfig())
    selected = batch["labels"] != IGNORE_INDEX
    inputs = batch["input_ids"]

    assert not (selected & special).any(), "special tokens must never be selected"
    assert torch.equal(inputs[special], original[special])
    assert torch.equal(batch["labels"][selected], original[selected])
    assert torch.equal(inputs[~selected], original[~selected])

    rate = selected.sum().item() / (~special).sum().item()
    assert rate == pytest.approx(0.15, abs=0.01)

    chosen = selected.sum().item()
    as_mask = (inputs[selected] == bert_tokenizer.mask_token_id).sum().item() / chosen
    kept = (inputs[selected] == original[selected]).sum().item() / chosen
    replaced = 1 - as_mask - kept
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert replaced == pytest.approx(0.1, abs=0.02)
    assert kept == pytest.approx(0.1, abs=0.02)
    assert inputs.max().item() < len(bert_tokenizer) and inputs.min().item() >= 0
    assert torch.equal(batch["attention_mask"], torch.ones_like(inputs))


def test_masking_fractions_follow_the_config(blocks, bert_tokenizer):
    settings = MlmConfig(mask_probability=0.3, mask_token_fraction=1.0, random_token_fraction=0.0)
    batch, _, special = masked(blocks, bert_tokenizer, settings)
    selected = batch["labels"] != IGNORE_INDEX
    assert selected.sum().item() / (~special).sum().item() == pytest.approx(0.3, abs=0.01)
    assert (batch["input_ids"][selected] == bert_tokenizer.mask_token_id).all()


def words_of(block) -> list[list[int]]:
    """Positions of each word in a block: a start token plus its continuation tokens."""
    words: list[list[int]] = []
    for position, (start, special) in enumerate(
        zip(block["word_start"], block["special_tokens_mask"], strict=True)
    ):
        if special:
            continue
        if start:
            words.append([position])
        elif words and words[-1][-1] == position - 1:
            words[-1].append(position)
    return words


def test_whole_word_masking_selects_every_sub_token(blocks, bert_tokenizer):
    batch, _, special = masked(blocks, bert_tokenizer, MlmConfig(whole_word_masking=True))
    selected = batch["labels"] != IGNORE_INDEX
    assert not (selected & special).any()
    words = picked = multi_piece_picked = 0
    for row, block in enumerate(blocks):
        for positions in words_of(block):
            flags = {bool(selected[row, p]) for p in positions}
            assert len(flags) == 1, f"block {row}: word at {positions} partly selected"
            words += 1
            picked += flags.pop()
            multi_piece_picked += len(positions) > 1 and bool(selected[row, positions[0]])
    assert picked / words == pytest.approx(0.15, abs=0.015)
    assert multi_piece_picked > 50, "the test needs selected words of several sub-tokens"


def test_masks_are_deterministic_per_seed_and_change_with_epoch(blocks, bert_tokenizer):
    first, _, _ = masked(blocks, bert_tokenizer, MlmConfig(), epoch=0)
    again, _, _ = masked(blocks, bert_tokenizer, MlmConfig(), epoch=0)
    next_epoch, _, _ = masked(blocks, bert_tokenizer, MlmConfig(), epoch=1)
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert torch.equal(first["labels"], again["labels"])
    changed = (first["labels"] != next_epoch["labels"]).any(dim=1)
    assert changed.float().mean().item() > 0.95


def test_mask_of_an_example_does_not_depend_on_its_batch(blocks, bert_tokenizer):
    collate = MaskedLMCollator(bert_tokenizer, MlmConfig())
    keyed = KeyedDataset(blocks, RUN_SEED)
    alone = collate([keyed[(3, 5)]])
    first = collate([keyed[(3, 5)], keyed[(3, 9)], keyed[(3, 0)]])
    last = collate([keyed[(3, 17)], keyed[(3, 5)]])
    for batch, row in ((first, 0), (last, 1)):
        assert torch.equal(batch["input_ids"][row], alone["input_ids"][0])
        assert torch.equal(batch["labels"][row], alone["labels"][0])


def test_example_seeds_differ_by_run_epoch_and_index():
    seeds = {
        example_seed(run, epoch, index)
        for run in (0, 42)
        for epoch in (-1, 0, 1, 2)
        for index in range(500)
    }
    assert len(seeds) == 2 * 4 * 500
    assert all(0 <= seed < 2**63 - 1 for seed in seeds)


def test_padding_collator_pads_inputs_masks_and_token_labels():
    examples = [
        {"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 0], "labels": [1, -100, 2]},
        {"input_ids": [8], "token_type_ids": [0], "labels": [3]},
    ]
    batch = PaddingCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert batch["labels"].tolist() == [[1, -100, 2], [3, -100, -100]]
    classes = PaddingCollator(0)(
        [{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}]
    )
    assert classes["labels"].tolist() == [1, 0]
    assert "token_type_ids" not in classes


def test_causal_collator_targets_are_the_inputs():
    batch = CausalLMCollator()([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5, 6]}])
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
