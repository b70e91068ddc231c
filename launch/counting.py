"""What a run trains, counted for `trainer plan` without loading weights: the training
examples (through the tokenization cache, as training gets them) and the parameters (on the
meta device: shapes, no storage; LoRA adapters attached there with peft, as training
attaches them, so the trainable count is peft's own; QLoRA's 4-bit weights apart)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

from trainer.config import RunConfig
from trainer.errors import UserError
from trainer.model import dtypes
from trainer.tasks.registry import TASKS, task_spec


@dataclass
class DataCount:
    """Training examples after encoding, or why they are unknown."""

    examples: int | None
    label_names: list[str] | None = None
    tokenizer_size: int | None = None
    unknown: str = ""


def count_examples(cfg: RunConfig) -> DataCount:
    """Training examples as training gets them: through the tokenization cache (which the
    plan thereby builds for the run). Fine-tuning data has one example per row, so its
    count survives a tokenizer that can't be loaded (an upper bound where sft's
    data.truncation drops rows); packed MLM/CLM blocks and packed sft rows need it."""
    import datasets

    from trainer.data.prepare import prepare_data
    from trainer.model.load import load_tokenizer

    if cfg.data.streaming:
        return DataCount(None, unknown="data.streaming: a stream's length is not known ahead")
    per_row = 1 + cfg.data.augment.copies  # each epoch adds the augmented variants
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # stdout is the plan; no progress lines on stderr
    try:
        data, tokenizer = prepare_data(cfg, lambda: load_tokenizer(cfg.model, task_spec(cfg)))
    except (UserError, OSError) as err:
        return _rows_only(cfg, per_row, str(err))
    finally:
        if bars:
            datasets.enable_progress_bars()
    return DataCount(sum(map(len, data.train)) * per_row, data.label_names, len(tokenizer))


def _rows_only(cfg: RunConfig, per_row: int, why: str) -> DataCount:
    """The count without a tokenizer: one example per row for fine-tuning, unknown for
    packed blocks; a problem with the rows themselves is what the plan then reports."""
    from trainer.data.prepare import read_splits

    try:
        trains, _, names = read_splits(cfg)
    except (UserError, OSError) as err:
        return DataCount(None, unknown=str(err))
    if TASKS[cfg.task].packed or cfg.data.packing:  # sft packs examples into rows
        return DataCount(None, names, unknown=why)
    return DataCount(sum(map(len, trains)) * per_row, names)


@dataclass
class ParamCount:
    """Parameters of the model as trained: all, trainable, and the frozen ones split into
    4-bit (QLoRA's quantized Linear weights) and the rest."""

    total: int
    trainable: int
    frozen_quantized: int = 0
    frozen_other: int = 0
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    vocab: int = 0
    model_class: str = ""
    largest_layer: int = 0  # parameters of the largest module (own, not its children's)
    checkpoint_dtype: str = "fp32"  # what model.dtype=auto loads (trainer/model/dtypes.py)


def _meta_model(cfg: RunConfig, data: DataCount):
    """The task's model on the meta device (shapes only) and its config."""
    import torch
    import transformers

    from trainer.model.load import load_model_config

    config = load_model_config(cfg.model, data.label_names)
    if data.tokenizer_size and data.tokenizer_size > config.vocab_size:
        config.vocab_size = data.tokenizer_size  # training resizes the embeddings to fit
    auto_class = getattr(transformers, task_spec(cfg).auto_class)
    with torch.device("meta"):
        model = auto_class.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    return model, config


def _quantized_weights(model) -> int:
    """Weights bitsandbytes stores in 4 bits: Linear (and GPT-2 Conv1D) layers outside the
    modules training keeps in full precision."""
    import torch
    from transformers.pytorch_utils import Conv1D

    from trainer.model.adapters import NOT_QUANTIZED

    kept = [name for name in NOT_QUANTIZED if not name.startswith(".")]
    return sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, (torch.nn.Linear, Conv1D))
        and not any(part in kept for part in name.split("."))
    )


def _lora_by_shapes(model, cfg: RunConfig) -> int:
    """Adapter parameters r·(d_in + d_out) per targeted Linear, when peft can't attach on
    the meta device (the heads trained in full are not counted then)."""
    import torch

    from trainer.model.adapters import default_target_modules

    targets = cfg.peft.target_modules or default_target_modules(model)
    if isinstance(targets, str):
        targets = [targets] if targets != "all-linear" else None
    return sum(
        cfg.peft.r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (targets is None or name.split(".")[-1] in targets)
    )


def count_parameters(cfg: RunConfig, data: DataCount) -> ParamCount:
    """Count the parameters without loading weights (see the module docstring)."""
    import torch

    from trainer.model.adapters import attach_adapter

    model, config = _meta_model(cfg, data)
    total = sum(p.numel() for p in model.parameters())
    dims = {
        "hidden": config.hidden_size,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "vocab": config.vocab_size,
        "model_class": type(model).__name__,
        # what ZeRO-3 materializes at once while loading (DeepSpeed's estimator counts alike)
        "largest_layer": max(
            sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules()
        ),
        "checkpoint_dtype": dtypes.from_torch(getattr(config, "dtype", None)),
    }
    if cfg.peft.method == "none":
        return ParamCount(total, total, **dims)
    quantized = _quantized_weights(model) if cfg.peft.method == "qlora" else 0
    try:  # counting only: the adapter shapes do not depend on quantization
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's deprecation notes are not the plan's
            adapted = attach_adapter(
                model, dataclasses.replace(cfg.peft, method="lora"), task_spec(cfg), False
            )
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        frozen = sum(p.numel() for p in adapted.parameters() if not p.requires_grad)
    except (RuntimeError, NotImplementedError, TypeError):
        trainable, frozen = _lora_by_shapes(model, cfg), total
    return ParamCount(total, trainable, quantized, frozen - quantized, **dims)
