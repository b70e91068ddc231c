"""trainer.tasks: the losses are summed over targets, shifted for CLM, and match HF's own."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from trainer.data.encode import IGNORE_INDEX
from trainer.tasks.losses import count_targets, next_token_loss, token_loss
from trainer.tasks.registry import TASKS


def test_token_loss_is_a_sum_over_labelled_positions():
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, IGNORE_INDEX, 4], [IGNORE_INDEX, IGNORE_INDEX, 0]])
    loss_sum, count = token_loss(logits, labels)
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
    assert count.item() == 3
    assert loss_sum.item() == pytest.approx(expected.item(), rel=1e-6)
    assert count_targets(labels, shifted=False).item() == 3
    assert count_targets(labels, shifted=True).item() == 2


def test_clm_loss_matches_the_model_own_shifted_loss(tiny_gpt2):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    input_ids = torch.randint(model.config.vocab_size, (3, 16))
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=input_ids)
    loss_sum, count = next_token_loss(output.logits, input_ids)
    assert count.item() == 3 * 15
    assert (loss_sum / count).item() == pytest.approx(output.loss.item(), rel=1e-5)


def test_mlm_loss_matches_the_model_own_loss(tiny_bert):
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert).eval()
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=generator)
    labels = torch.where(torch.rand(2, 12, generator=generator) < 0.3, input_ids, IGNORE_INDEX)
    with torch.no_grad():
        output = model(input_ids=input_ids, labels=labels)
    loss_sum, count = TASKS["mlm"].loss(output.logits, labels)
    assert (loss_sum / count).item() == pytest.approx(output.loss.item(), rel=1e-5)


def test_task_table_covers_every_task():
    assert set(TASKS) == {
        *("mlm", "clm", "classification", "token-classification", "sft", "preference")
    }
    assert TASKS["sft"].shifted_targets and not TASKS["sft"].has_labels
    assert TASKS["clm"].shifted_targets and not TASKS["mlm"].shifted_targets
    assert TASKS["classification"].has_labels and TASKS["token-classification"].has_labels
    assert not TASKS["mlm"].has_labels
    assert (
        TASKS["preference"].sequences_per_example == 2 and TASKS["sft"].sequences_per_example == 1
    )
