"""One forward pass, as training steps and evaluation run it.

The model gets no labels, so it computes no loss of its own: the task's loss is computed
from the logits by `TaskSpec.loss`, normalised over the whole accumulation window.

Masked-LM heads project only the labelled positions onto the vocabulary. Only ~15% of an
MLM batch's tokens have a target, but the model's head would project all of them: for a
small encoder with a 30k vocabulary that projection (and its backward) is about half of
the step's FLOPs. A forward pre-hook on the model's output projection hands it the hidden
states of the labelled positions only, so the logits come back as [targets, vocab] next to
the matching labels. The loss is the same sum over the same targets; only the wasted work
goes. The hook runs inside the model's own forward, so ZeRO-3 and FSDP still gather the
projection's parameters as they do for any module.

No forward here keeps a key/value cache. A decoder (GPT-2, Llama, also under a classification
head) builds one on every forward when its config's `use_cache` is on, as it is in every
saved checkpoint: a `DynamicCache` holding each layer's keys and values, returned in the
output and kept alive with it, i.e. until after the backward pass and through the next
micro-batch's forward. Training and evaluation never decode step by step, so the forward
asks for none.
"""

from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel

from trainer.data.encode import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the forward pass gets: no labels, so the model computes no loss of its own."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Move a collated batch to the device without blocking on pinned memory."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def without_cache(model: torch.nn.Module) -> dict[str, bool]:
    """`use_cache=False` for a model that can cache keys and values, which its config says by
    having a `use_cache` setting (BERT's does too and accepts the argument); nothing for a
    model without one, whose forward may not take the argument."""
    config = getattr(extract_model_from_parallel(model), "config", None)
    return {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}


def output_projection(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module that maps hidden states onto the vocabulary (BERT's decoder), through
    DDP / DeepSpeed / torch.compile wrappers and PEFT models; None when the model has none."""
    inner = extract_model_from_parallel(model)
    get = getattr(inner, "get_output_embeddings", None)
    return get() if callable(get) else None


def forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], targets_only: bool
) -> tuple[object, torch.Tensor]:
    """The model's output on `batch` and the labels its logits line up with.

    With `targets_only` (MLM), the output projection sees only the labelled positions: the
    logits are [targets, vocab] and the labels the matching 1-D selection. A model whose
    projection gets hidden states of another shape (one that already selects positions
    itself) is left alone and its labels returned whole."""
    labels = batch["labels"]
    inputs = model_inputs(batch) | without_cache(model)
    head = output_projection(model) if targets_only else None
    if head is None:
        return model(**inputs), labels
    selected = labels != IGNORE_INDEX
    applied = []

    def select(module: torch.nn.Module, args: tuple) -> tuple | None:
        hidden = args[0]
        if hidden.shape[:-1] != selected.shape:
            return None
        applied.append(True)
        return (hidden[selected], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        output = model(**inputs)
    finally:
        handle.remove()
    return output, labels[selected] if applied else labels
