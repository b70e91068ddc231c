"""The run config: what to train, as grouped dataclasses, loaded from YAML plus overrides.

This module imports nothing heavy (no torch, no transformers) so that a bad config is
rejected in well under a second, before any model or data is touched. Every problem is
collected and reported together, each naming its dotted key; unknown keys come with the
closest valid name. The field `help` strings are the config reference (`trainer keys`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from pathlib import Path
from typing import Any

import yaml

# The schema is read through this module too: its names are re-exported.
from trainer.config_schema import (
    ATTENTION as ATTENTION,
    AUGMENT_OPERATIONS as AUGMENT_OPERATIONS,
    CLASS_WEIGHTS as CLASS_WEIGHTS,
    ON_NONFINITE as ON_NONFINITE,
    PEFT_METHODS as PEFT_METHODS,
    PRECISIONS as PRECISIONS,
    PREFERENCE_LOSSES as PREFERENCE_LOSSES,
    SCHEDULERS as SCHEDULERS,
    TRUNCATIONS as TRUNCATIONS,
    WEIGHT_DTYPES as WEIGHT_DTYPES,
    AugmentConfig as AugmentConfig,
    CheckpointConfig as CheckpointConfig,
    DataConfig as DataConfig,
    EvalConfig as EvalConfig,
    LogConfig as LogConfig,
    MlmConfig as MlmConfig,
    ModelConfig as ModelConfig,
    PeftConfig as PeftConfig,
    PreferenceConfig as PreferenceConfig,
    RunConfig as RunConfig,
    TrainConfig as TrainConfig,
)
from trainer.data.chat_templates import template_text
from trainer.data.sources import train_sources
from trainer.durations import parse_duration
from trainer.errors import UserError
from trainer.global_batch import fit_micro_batch
from trainer.input_checks import check_inputs
from trainer.security import redact, untrusted_resume
from trainer.tasks import tag_schemes
from trainer.tasks.preference import needs_frozen_reference
from trainer.tasks.registry import TASKS, task_spec
from trainer.tasks.spec import TaskSpec
from trainer.trackers import check_log_trackers
from trainer.yaml_sections import apply_overrides, build_section, read_yaml


def all_keys(cls: type = RunConfig, prefix: str = "") -> dict[str, dataclasses.Field]:
    """Every valid dotted key with its field, in declaration order; sections (at any depth,
    e.g. `data.augment`) are not keys themselves but lead to theirs."""
    keys: dict[str, dataclasses.Field] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys[f"{prefix}{f.name}"] = f
    return keys


# --- validation ---------------------------------------------------------------------------


def _choice(errors: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        errors.append(f"{key}: '{value}' is not one of {', '.join(allowed)}")


def _check_choices(cfg: RunConfig, errors: list[str]) -> None:
    """Keys that take one of a few names."""
    _choice(errors, "task", cfg.task, tuple(TASKS))
    _choice(errors, "train.scheduler", cfg.train.scheduler, SCHEDULERS)
    _choice(errors, "train.precision", cfg.train.precision, PRECISIONS)
    if cfg.model.attn_implementation is not None:
        _choice(errors, "model.attn_implementation", cfg.model.attn_implementation, ATTENTION)
    _choice(errors, "peft.method", cfg.peft.method, PEFT_METHODS)
    if cfg.model.dtype is not None:
        _choice(errors, "model.dtype", cfg.model.dtype, WEIGHT_DTYPES)
    _choice(errors, "train.on_nonfinite", cfg.train.on_nonfinite, ON_NONFINITE)
    _choice(errors, "data.truncation", cfg.data.truncation, TRUNCATIONS)
    _choice(errors, "preference.loss", cfg.preference.loss, PREFERENCE_LOSSES)
    if cfg.data.chat_template is not None:
        try:
            template_text(cfg.data.chat_template)
        except UserError as err:
            errors.append(str(err))
    if cfg.train.max_time is not None and parse_duration(cfg.train.max_time) is None:
        errors.append(
            f"train.max_time: '{cfg.train.max_time}' is not a non-zero SLURM time (MM, "
            "MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS); leave it unset for no limit"
        )
    check_log_trackers(cfg.log.trackers, cfg.log.tracker_options, errors)
    if cfg.data.tag_scheme is not None:
        _choice(errors, "data.tag_scheme", cfg.data.tag_scheme, tag_schemes.SCHEMES)
    _check_class_weights(cfg.data.class_weights, errors)


def _check_ranges(cfg: RunConfig, errors: list[str]) -> None:
    """Numbers that must be positive, non-negative or within bounds."""
    positive = {
        "data.max_length": cfg.data.max_length,
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "train.lr": cfg.train.lr,
        "eval.batch_size": cfg.eval.batch_size,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "log.every_steps": cfg.log.every_steps,
        "train.max_nonfinite_in_a_row": cfg.train.max_nonfinite_in_a_row,
        "train.collective_timeout": cfg.train.collective_timeout,
        "peft.r": cfg.peft.r,
        "peft.alpha": cfg.peft.alpha,
        "preference.beta": cfg.preference.beta,
    }
    if cfg.train.head_lr is not None:
        positive["train.head_lr"] = cfg.train.head_lr
    non_negative = {
        "train.epochs": cfg.train.epochs,
        "train.max_steps": cfg.train.max_steps,
        "train.weight_decay": cfg.train.weight_decay,
        "train.max_grad_norm": cfg.train.max_grad_norm,
        "eval.every_steps": cfg.eval.every_steps,
        "eval.generate": cfg.eval.generate,
        "eval.early_stopping_patience": cfg.eval.early_stopping_patience,
        "eval.early_stopping_min_delta": cfg.eval.early_stopping_min_delta,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "checkpoint.every_minutes": cfg.checkpoint.every_minutes,
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "data.augment.copies": cfg.data.augment.copies,
        "preference.simpo_gamma": cfg.preference.simpo_gamma,
        "preference.orpo_lambda": cfg.preference.orpo_lambda,
        "preference.sft_weight": cfg.preference.sft_weight,
    }
    # written as "not (v > 0)" so that NaN fails too
    errors += [f"{k}: must be > 0, got {v}" for k, v in positive.items() if not v > 0]
    errors += [f"{k}: must be >= 0, got {v}" for k, v in non_negative.items() if not v >= 0]
    _check_bounds(cfg, errors)


def _check_bounds(cfg: RunConfig, errors: list[str]) -> None:
    """Shares, probabilities and factors: numbers within an interval."""
    bounded = [  # key, value, low, high, is the low end open, is the high end open
        ("data.validation_split", cfg.data.validation_split, 0, 1, False, True),
        ("peft.dropout", cfg.peft.dropout, 0, 1, False, True),
        ("train.warmup_ratio", cfg.train.warmup_ratio, 0, 1, False, True),
        ("eval.early_stopping_min_share", cfg.eval.early_stopping_min_share, 0, 1, False, False),
        ("train.layerwise_lr_decay", cfg.train.layerwise_lr_decay, 0, 1, True, False),
        ("preference.label_smoothing", cfg.preference.label_smoothing, 0, 0.5, False, True),
        ("mlm.mask_probability", cfg.mlm.mask_probability, 0, 1, True, True),
        ("mlm.mask_token_fraction", cfg.mlm.mask_token_fraction, 0, 1, False, False),
        ("mlm.random_token_fraction", cfg.mlm.random_token_fraction, 0, 1, False, False),
        *[
            (f"data.augment.{op}", getattr(cfg.data.augment, op), 0, 1, False, False)
            for op in AUGMENT_OPERATIONS
        ],
    ]
    if cfg.train.head_warmup_ratio is not None:
        bounded.append(("train.head_warmup_ratio", cfg.train.head_warmup_ratio, 0, 1, False, True))
    for key, value, low, high, low_open, high_open in bounded:
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            span = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            errors.append(f"{key}: must be in {span}, got {value}")
    if cfg.mlm.mask_token_fraction + cfg.mlm.random_token_fraction > 1:
        errors.append("mlm.random_token_fraction: mask_token_fraction + random_token_fraction > 1")


def _check_class_weights(value: str | dict, errors: list[str]) -> None:
    """`none`, `auto`, or positive finite weights (which labels exist is known only once
    the data is read: run/setup.py checks the keys then)."""
    if isinstance(value, str):
        _choice(errors, "data.class_weights", value, CLASS_WEIGHTS)
        return
    for label, weight in value.items():
        number = isinstance(weight, (int, float)) and not isinstance(weight, bool)
        if not (number and 0 < weight < math.inf):
            errors.append(f"data.class_weights.{label}: must be a number > 0, got {weight!r}")


def _tasks_where(fact: str, joiner: str = " or ", holds: bool = True) -> str:
    """The names of the tasks whose spec has `fact` (or lacks it), for messages."""
    return joiner.join(name for name, spec in TASKS.items() if bool(getattr(spec, fact)) == holds)


def _check_data_extras(cfg: RunConfig, errors: list[str]) -> None:
    """Class weights need classes; augmentation edits whole texts, keeping their label."""
    spec = task_spec(cfg)
    if cfg.data.class_weights != "none" and not spec.has_labels:
        errors.append(
            f"data.class_weights: only for task {_tasks_where('has_labels')}, not '{cfg.task}'"
        )
    augment = cfg.data.augment
    if not augment.copies:
        return
    if not spec.augmentable:
        errors.append(
            f"data.augment.copies: only for task {_tasks_where('augmentable')}, not '{cfg.task}'"
        )
    if isinstance(cfg.data.train, list) and len(cfg.data.train) > 1:
        errors.append("data.augment.copies: with one data.train source, not a mixture")
    if not any(getattr(augment, op) > 0 for op in AUGMENT_OPERATIONS):
        errors.append(
            f"data.augment.copies: every operation ({', '.join(AUGMENT_OPERATIONS)}) is 0"
        )
    if (augment.insertion > 0 or augment.synonym_replacement > 0) and not augment.synonyms:
        errors.append(
            "data.augment.synonyms: insertion and synonym_replacement need a synonym table "
            "(or set them to 0)"
        )
    elif augment.synonyms and not Path(augment.synonyms).expanduser().is_file():
        errors.append(f"data.augment.synonyms: file not found: {augment.synonyms}")


def _check_generation(cfg: RunConfig, spec: TaskSpec, errors: list[str]) -> None:
    """eval.generate needs a task whose model answers prompts; the answer scores it adds
    (exact_match, contains) may pick the best model only while it is on."""
    generates = cfg.eval.generate > 0
    if generates and not spec.prediction.generates:
        tasks = " or ".join(name for name, task in TASKS.items() if task.prediction.generates)
        errors.append(
            f"eval.generate: only for task {tasks} (models that generate), not '{cfg.task}'"
        )
    if cfg.eval.metric is None:
        return
    if generates and cfg.eval.metric in spec.answer_metrics:
        return
    if cfg.eval.metric in spec.answer_metrics:
        errors.append(
            f"eval.metric: {cfg.eval.metric} scores generated answers, only with eval.generate > 0"
        )
        return
    _choice(errors, "eval.metric", cfg.eval.metric, spec.metrics)


def _check_consistency(cfg: RunConfig, world_size: int, for_training: bool, errors: list[str]):
    """Checks across keys; the training-only ones are skipped for `trainer evaluate`."""
    if not cfg.model.name_or_path:
        errors.append("model.name_or_path: required (a hub id or a local model folder)")
    if cfg.mlm.next_sentence and cfg.task != "mlm":
        errors.append(f"mlm.next_sentence: only with task mlm (task is '{cfg.task}')")
    elif cfg.task in TASKS:
        _check_generation(cfg, task_spec(cfg), errors)
    if cfg.mlm.next_sentence and cfg.peft.method != "none":
        errors.append("mlm.next_sentence: the pretraining heads train in full; not with peft")
    if cfg.mlm.next_sentence and cfg.data.streaming:
        errors.append("mlm.next_sentence: pairs are drawn across documents; not with streaming")
    if cfg.mlm.next_sentence and cfg.data.isolate_documents:
        errors.append("data.isolate_documents: sentence pairs are not packed; not with NSP")
    if not for_training:
        return
    if not cfg.data.train:
        errors.append("data.train: required (a data file or a hub dataset name)")
    if cfg.train.epochs == 0 and cfg.train.max_steps == 0:
        errors.append("train.epochs: set train.epochs or train.max_steps above 0")
    train = cfg.train  # its micro_batch_size is the most per forward pass
    train.micro_batch_size = fit_micro_batch(
        train.global_batch_size, train.micro_batch_size, world_size, errors
    )
    if cfg.peft.method == "qlora" and cfg.model.from_scratch:
        errors.append("peft.method: qlora quantizes pretrained weights; not with from_scratch")
    if cfg.model.dtype == "fp16" and cfg.peft.method == "none":
        errors.append("model.dtype: fp16 weights can't train in full (no fp32 master); use bf16")
    if cfg.data.validation and cfg.data.validation_split:
        errors.append("data.validation_split: can't use both data.validation and a split")
    train_sources(cfg.data, errors)
    _check_data_layout(cfg, errors)
    errors += untrusted_resume(cfg.train.resume, cfg.output_dir, cfg.train.resume_trusted)
    has_validation = bool(cfg.data.validation or cfg.data.validation_split)
    if cfg.eval.early_stopping_patience and not has_validation:
        errors.append("eval.early_stopping_patience: needs data.validation or validation_split")
    if cfg.eval.generate > 0 and not has_validation:
        errors.append("eval.generate: needs data.validation or validation_split")
    if cfg.task in TASKS:
        _check_data_extras(cfg, errors)
    if cfg.preference.precompute_reference and not needs_frozen_reference(cfg):
        errors.append(
            "preference.precompute_reference: replaces the frozen reference copy of full "
            "fine-tuning with dpo/ipo; LoRA/QLoRA (the adapter disabled) and simpo/orpo hold none"
        )
    if cfg.preference.sft_weight and cfg.preference.loss == "orpo":
        errors.append("preference.sft_weight: orpo has its own SFT term (orpo_lambda weighs it)")


def _check_data_layout(cfg: RunConfig, errors: list[str]) -> None:
    """Streaming, packing and batching options that only make sense for some tasks."""
    packed = cfg.task in TASKS and TASKS[cfg.task].packed
    packing_tasks = _tasks_where("packed", " and ")
    if cfg.data.streaming:
        if not (cfg.task in TASKS and TASKS[cfg.task].stream_blocks):
            errors.append(
                f"data.streaming: only for {_tasks_where('stream_blocks', ', ')} (the other "
                "tasks' sets fit in memory)"
            )
        if not cfg.train.max_steps:
            errors.append("data.streaming: a stream has no known length; set train.max_steps")
        if cfg.data.validation_split:
            errors.append("data.validation_split: not with streaming; name data.validation")
        if cfg.data.group_by_length and not packed:
            errors.append("data.group_by_length: not with streaming (rows come in file order)")
    if cfg.data.group_by_length and packed:
        errors.append(
            f"data.group_by_length: {_tasks_where('packed', '/')} blocks are packed to "
            f"max_length already; only for {_tasks_where('packed', ' and ', holds=False)}"
        )
    if cfg.data.isolate_documents and not packed:
        errors.append(f"data.isolate_documents: only for {packing_tasks} (packed documents)")
    if cfg.data.packing and cfg.task in TASKS and TASKS[cfg.task].packed:
        errors.append("data.packing: this task packs its texts already (see isolate_documents)")
    elif cfg.data.packing and not (cfg.task in TASKS and TASKS[cfg.task].packs_examples):
        errors.append(f"data.packing: only for {_tasks_where('packs_examples', ' and ')}")


def world_size_from_env() -> int:
    """Processes in this job as set by torchrun / accelerate launch (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_config(raw: dict, for_training: bool = True, world_size: int | None = None) -> RunConfig:
    """Turn a raw mapping into a validated RunConfig, or raise one UserError listing it all."""
    errors: list[str] = []
    cfg = build_section(RunConfig, raw, "", errors)
    _check_choices(cfg, errors)  # fields that failed their type check hold defaults here
    _check_ranges(cfg, errors)
    _check_consistency(cfg, world_size or world_size_from_env(), for_training, errors)
    check_inputs(cfg, for_training, errors)  # folders, packages, seed range, LoRA dtypes
    if errors:
        raise UserError("; ".join(errors))
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config file, apply command-line overrides, validate for training."""
    return build_config(apply_overrides(read_yaml(path), overrides or []))


def to_dict(cfg: RunConfig) -> dict:
    """Plain nested dict of a config, secrets redacted: what is written and logged."""
    return redact(dataclasses.asdict(cfg))


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML text (sections in declaration order, secrets redacted)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
