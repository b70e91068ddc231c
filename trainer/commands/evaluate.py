"""`trainer evaluate`: score any saved model folder on a data file.

A run's `final/` carries the config it was trained with (columns, max_length, task), so
it needs no options (`eval.generate=N` also answers the first N rows' prompts and, for
sft, scores the answers); a plain Hugging Face folder needs at least `task=...` when its
architecture does not say (e.g. a base `BertModel` scored with `task=mlm`).
"""

from __future__ import annotations

from accelerate import Accelerator

from trainer import progress
from trainer.data.read import check_labels, read_split
from trainer.devices import cpu_only
from trainer.errors import UserError
from trainer.model.load import load_tokenizer, warn_random_head
from trainer.model.saved import SavedModel
from trainer.run.evaluation import evaluate
from trainer.run.samples import answer_scores, generate_samples, prompts_of
from trainer.tasks.registry import task_spec


def score(model_dir: str, data: str, overrides: list[str]) -> dict:
    """Metrics of the model in `model_dir` on `data`, computed like validation in training."""
    saved = SavedModel.read(model_dir)
    cfg = saved.run_config(overrides, evaluate_on=data)
    spec = task_spec(cfg)
    if spec.make_objective is not None:  # its rewards are against the initial model
        raise UserError(
            f"MODEL_DIR: {cfg.task} models are scored against the model they started from, "
            "which a saved folder does not hold; the run's eval_results.json has the scores"
        )
    accelerator = Accelerator(cpu=cpu_only(), mixed_precision=cfg.train.precision)
    tokenizer = load_tokenizer(cfg.model, spec)
    label_names = None
    if spec.has_labels:
        label_names = saved.label_names
        if label_names is None:
            raise UserError(f"MODEL_DIR: {model_dir} has no trained {cfg.task} head to score")
    split = read_split(data, "--data", spec.rows, cfg.data)
    if label_names is not None:
        check_labels(split, label_names, spec.rows)
    with progress.counting(len(split), "tokenize --data"):
        examples = spec.encode(split, tokenizer, label_names, cfg.data)
    model = saved.load(
        spec, tokenizer, cfg.peft, cfg.train.precision, cfg.train.seed, model_dtype=cfg.model.dtype
    )
    if not saved.is_adapter:  # an adapter carries the head it trained
        warn_random_head(model, f"MODEL_DIR: {model_dir}", spec.name, "these scores are noise")
    model = accelerator.prepare(model)
    results = evaluate(
        model,
        examples,
        spec.make_collator(tokenizer, cfg),
        spec,
        spec.make_metrics(label_names, cfg.data),
        accelerator,
        cfg.eval.batch_size,
        cfg.train.seed,
    )
    if cfg.eval.generate > 0:  # the first N rows' prompts answered, as at evaluation in training
        prompts = prompts_of(split, spec, tokenizer, cfg.data, cfg.eval.generate)
        samples = generate_samples(
            model, prompts, tokenizer, accelerator, cfg.eval.max_new_tokens, cfg.eval.batch_size
        )
        results |= {**answer_scores(samples), "samples": samples}
    return {"task": cfg.task, "examples": len(examples), **results}
