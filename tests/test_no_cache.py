"""No key/value cache in training or evaluation: a decoder's forward (language model or
classifier) returns no cache, an encoder's forward still runs, and a training step and an
evaluation call the model with use_cache=False."""

from __future__ import annotations

import datasets
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from trainer.config import DataConfig
from trainer.run.evaluation import evaluate
from trainer.run.forward import forward
from trainer.run.step import optimizer_step
from trainer.tasks.registry import TASKS


def _clm_batch(vocab_size: int, rows: int = 2) -> dict[str, torch.Tensor]:
    ids = torch.randint(5, vocab_size, (rows, 16), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_a_decoder_forward_builds_no_cache(tiny_gpt2):
    lm = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    batch = _clm_batch(lm.config.vocab_size)
    assert lm.config.use_cache  # as saved: the model itself would build one
    assert lm(input_ids=batch["input_ids"]).cache is not None
    output, _ = forward(lm, batch, targets_only=False)
    assert output.cache is None
    classifier = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2, num_labels=2)
    classifier.config.pad_token_id = classifier.config.eos_token_id
    batch["labels"] = torch.tensor([0, 1])
    output, _ = forward(classifier, batch, targets_only=False)
    assert output.cache is None and output.logits.shape == (2, 2)


class _Calls:
    """The keyword arguments of every forward call of a module, and whether its output held a
    cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: list[tuple[object, bool]] = []
        model.register_forward_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs, output) -> None:
        self.seen.append((kwargs.get("use_cache"), output.cache is not None))


def test_training_and_evaluation_forwards_ask_for_no_cache(tiny_gpt2):
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    calls = _Calls(model)
    window = [_clm_batch(model.config.vocab_size) for _ in range(2)]
    spec = TASKS["clm"]
    assert not optimizer_step(model, window, spec, accelerator, optimizer, scheduler, 1.0).skipped
    rows = datasets.Dataset.from_list([{k: v[0].tolist() for k, v in window[0].items()}] * 3)

    def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
        return {key: torch.tensor([e[key] for e in examples]) for key in examples[0]}

    evaluate(
        model, rows, collate, spec, spec.make_metrics(None, DataConfig()), accelerator, 2, seed=0
    )
    assert calls.seen == [(False, False)] * 4  # two micro-batches, two evaluation batches
