"""fp16 after a skipped step: `clip_grad_norm_` unscales the gradients, so a step skipped as
non-finite must still let the grad scaler update, or the next step fails with "unscale_()
has already been called". On the CPU a real `torch.amp.GradScaler("cpu")` stands in for the
CUDA one Accelerate would make (it makes none on a CPU); the same check runs on a GPU."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from accelerate import Accelerator
from interrupted_runs import assert_same_tensors
from transformers import AutoModelForMaskedLM

from trainer.run.step import optimizer_step
from trainer.tasks.registry import TASKS

GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA")]


def fp16_accelerator(device: str) -> Accelerator:
    """An fp16 Accelerator with its grad scaler: Accelerate's own on CUDA, on the CPU a real
    CPU GradScaler set where Accelerate would have put the CUDA one."""
    accelerator = Accelerator(gradient_accumulation_steps=2, mixed_precision="fp16")
    if device == "cpu":
        assert accelerator.device.type == "cpu" and accelerator.scaler is None
        accelerator.native_amp = True  # autocast to fp16 and unscale in clip_grad_norm_
        accelerator.scaler = torch.amp.GradScaler("cpu")
    assert accelerator.scaler is not None and accelerator.device.type == device
    return accelerator


def _window(vocab_size: int, device: str) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (4, 16), generator=generator)
    labels = torch.where(torch.rand(4, 16, generator=generator) < 0.3, ids, -100)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return [{k: v[i : i + 2].to(device) for k, v in batch.items()} for i in (0, 2)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU_ONLY)])
def test_a_skipped_fp16_step_leaves_the_scaler_ready(device, tiny_bert):
    accelerator = fp16_accelerator(device)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    window = _window(model.config.vocab_size, device)
    calls = itertools.count()

    def nan_in_first_step(logits, labels, weight=None):
        loss_sum, count = TASKS["mlm"].loss(logits, labels, weight)
        return (loss_sum * float("nan") if next(calls) < 2 else loss_sum), count

    spec = dataclasses.replace(TASKS["mlm"], loss=nan_in_first_step)
    scale = accelerator.scaler.get_scale()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert optimizer_step(model, window, spec, accelerator, optimizer, scheduler, 1.0).skipped
    assert_same_tensors(model.state_dict(), before)
    assert scheduler.last_epoch == 0
    # The next step unscales again and updates.
    assert not optimizer_step(model, window, spec, accelerator, optimizer, scheduler, 1.0).skipped
    assert scheduler.last_epoch == 1
    assert accelerator.scaler.get_scale() == scale / 2  # the NaN gradients backed it off
    name = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(model.state_dict()[name], before[name])
