"""trainer.run.forward: projecting only MLM targets gives the same loss and the same gradients as
projecting every position, with logits only where there is a target."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoModelForPreTraining

from trainer.data.encode import IGNORE_INDEX
from trainer.run.forward import forward
from trainer.tasks.losses import token_loss


def _batch(vocab_size: int, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (3, 16), generator=generator)
    labels = torch.where(torch.rand(3, 16, generator=generator) < 0.2, input_ids, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _loss_and_grads(model, batch, targets_only: bool, logits_key: str):
    model.zero_grad()
    output, labels = forward(model, batch, targets_only)
    loss_sum, count = token_loss(output[logits_key], labels)
    loss_sum.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output[logits_key], loss_sum.detach(), count, grads


@pytest.mark.parametrize(
    ("auto_class", "logits_key"),
    [(AutoModelForMaskedLM, "logits"), (AutoModelForPreTraining, "prediction_logits")],
)
def test_targets_only_matches_the_full_projection(tiny_bert, auto_class, logits_key):
    torch.manual_seed(0)
    model = auto_class.from_pretrained(tiny_bert).eval()  # eval: no dropout between the two
    batch = _batch(model.config.vocab_size)
    targets = int((batch["labels"] != IGNORE_INDEX).sum())
    full_logits, full_loss, full_count, full_grads = _loss_and_grads(
        model, batch, False, logits_key
    )
    logits, loss, count, grads = _loss_and_grads(model, batch, True, logits_key)
    assert full_logits.shape == (3, 16, model.config.vocab_size)
    assert logits.shape == (targets, model.config.vocab_size)
    assert count.item() == full_count.item() == targets
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, full_grads[name], rtol=1e-5, atol=1e-7, msg=name)


class _SelectsItself(torch.nn.Module):
    """A model whose head already gets fewer positions than the batch has (as models with
    their own sparse prediction do): the hook must leave it alone."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask):
        return {"logits": self.head(self.embed(input_ids)[:, :2])}


def test_a_head_that_gets_other_positions_keeps_its_labels():
    batch = _batch(10)
    output, labels = forward(_SelectsItself(), batch, targets_only=True)
    assert output["logits"].shape == (3, 2, 10)
    assert labels is batch["labels"]
