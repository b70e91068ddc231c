"""`trainer evaluate`: score any saved model folder on a data file.

A run's `final/` carries the config it was trained with (columns, max_length, task), so
it needs no options; a plain Hugging Face folder needs at least `task=...` when its
architecture does not say (e.g. a base `BertModel` scored with `task=mlm`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator

from trainer.config import RunConfig, apply_overrides, build_config, read_yaml
from trainer.data.read import check_labels, read_split
from trainer.errors import UserError
from trainer.model.load import (
    load_model_config,
    load_tokenizer,
    load_trained,
    saved_label_names,
    task_of_saved_model,
)
from trainer.run.checkpoint import RUN_CONFIG_NAME
from trainer.run.evaluation import evaluate
from trainer.tasks.spec import task_spec


def scoring_config(model_dir: str, data: str, overrides: list[str]) -> RunConfig:
    """The saved run config (if any) with the model, data and overrides put in."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise UserError(f"MODEL_DIR: {model_dir} is not a model folder (no config.json)")
    saved = folder / RUN_CONFIG_NAME
    raw = read_yaml(saved) if saved.is_file() else {}
    if isinstance(raw.get("model"), dict):
        raw["model"].pop("tokenizer", None)  # the folder holds the tokenizer it trained with
    raw = apply_overrides(raw, overrides)
    raw.setdefault("model", {}).update(name_or_path=str(folder), from_scratch=False)
    raw.setdefault("data", {}).update(validation=data, train=None, validation_split=0.0)
    if not raw.get("task"):
        raw["task"] = task_of_saved_model(str(folder))
        if raw["task"] is None:
            raise UserError(
                f"task: can't tell which task {model_dir} serves; pass task=mlm, clm, "
                "classification or token-classification"
            )
    return build_config(raw, for_training=False)


def score(model_dir: str, data: str, overrides: list[str]) -> dict:
    """Metrics of the model in `model_dir` on `data`, computed like validation in training."""
    cfg = scoring_config(model_dir, data, overrides)
    spec = task_spec(cfg)
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.precision
    )
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    label_names = None
    if spec.has_labels:
        label_names = saved_label_names(load_model_config(cfg.model, None))
        if label_names is None:
            raise UserError(f"MODEL_DIR: {model_dir} has no trained {cfg.task} head to score")
    split = read_split(data, "--data", cfg.task, cfg.data)
    if label_names is not None:
        check_labels(split, label_names, cfg.task)
    examples = spec.encode(split, tokenizer, label_names, cfg.data.max_length)
    model = load_trained(
        cfg.model.name_or_path, cfg.head, tokenizer, cfg.peft, cfg.train.precision, cfg.train.seed
    )
    model = accelerator.prepare(model)
    results = evaluate(
        model,
        examples,
        spec.make_collator(tokenizer, cfg),
        spec,
        spec.make_metrics(label_names),
        accelerator,
        cfg.eval.batch_size,
        cfg.train.seed,
    )
    return {"task": cfg.task, "examples": len(examples), **results}
