"""`trainer train`: set a run up, then one loop for every task, read top to bottom.

Set-up reads and checks the data before the model is loaded (a bad row costs seconds, not a
model download), derives gradient accumulation from the global batch, and writes the
resolved config. The loop runs optimizer steps over global batches (see sampling.py),
evaluates, keeps the best model, and leaves `final/`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from trainer.adapters import attach_adapter, quantization_config
from trainer.checkpoint import save_model, save_training_state
from trainer.config import LOWER_IS_BETTER, RunConfig, dump_yaml, world_size_from_env
from trainer.data import Split, carve_validation, check_labels, label_names_from, read_split
from trainer.errors import UserError
from trainer.evaluation import evaluate, model_inputs, to_device
from trainer.model import load_model, load_tokenizer
from trainer.optim import build_optimizer, build_scheduler
from trainer.sampling import BatchPlan, KeyedDataset
from trainer.tasks import TASKS, TaskSpec, count_targets
from trainer.tracking import RunLog


class RunFinished(Exception):
    """The output_dir already holds a finished run: nothing to do."""


# --- set-up ------------------------------------------------------------------------------


def read_splits(cfg: RunConfig) -> tuple[Split, Split | None, list[str] | None]:
    """Train and validation rows, checked, with the label names the data defines."""
    train = read_split(cfg.data.train, "data.train", cfg.task, cfg.data)
    validation = None
    if cfg.data.validation:
        validation = read_split(cfg.data.validation, "data.validation", cfg.task, cfg.data)
    elif cfg.data.validation_split:
        train, validation = carve_validation(train, cfg.data.validation_split, cfg.train.seed)
    label_names = label_names_from(train, cfg.task) if TASKS[cfg.task].has_labels else None
    if validation is not None and label_names is not None:
        check_labels(validation, label_names, cfg.task)
    return train, validation, label_names


def prepare_run_dir(cfg: RunConfig) -> Path:
    """The run directory, refusing to overwrite an earlier run's results."""
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    if (run_dir / "final").is_dir():
        raise RunFinished(f"run already finished: {run_dir / 'final'} exists; nothing to do")
    if (run_dir / "metrics.jsonl").exists():
        raise UserError(
            f"output_dir: {run_dir} holds an unfinished run; choose another output_dir or remove it"
        )
    return run_dir


def make_accelerator(cfg: RunConfig, run_dir: Path, accumulation_steps: int) -> Accelerator:
    """Accelerate owns devices, processes, precision, accumulation and trackers."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # so that torchrun on CPU gives gloo DDP
        mixed_precision=cfg.train.precision,
        gradient_accumulation_steps=accumulation_steps,
        log_with=list(cfg.log.trackers) or None,
        project_dir=str(run_dir),
    )
    if accelerator.num_processes != world_size_from_env():
        raise RuntimeError(  # ranks would overwrite each other's files: a launch bug
            f"WORLD_SIZE={world_size_from_env()} but Accelerate runs "
            f"{accelerator.num_processes} process(es)"
        )
    return accelerator


@dataclass
class Best:
    """Best evaluation so far by `eval.metric`, and how many evaluations since it improved."""

    metric: str
    value: float | None = None
    results: dict | None = None
    step: int = 0
    stale: int = 0

    def update(self, results: dict, step: int) -> bool:
        """Record an evaluation; True when it is the new best."""
        value = results[self.metric]
        better = self.value is None or (
            value < self.value if self.metric in LOWER_IS_BETTER else value > self.value
        )
        if better:
            self.value, self.results, self.step, self.stale = value, results, step, 0
        else:
            self.stale += 1
        return better


def build_model(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase, label_names) -> torch.nn.Module:
    """The model to train: full, or the base (4-bit for QLoRA) wrapped with a LoRA adapter."""
    quantization = quantization_config(cfg.train.precision) if cfg.peft.method == "qlora" else None
    model = load_model(cfg.model, cfg.task, tokenizer, label_names, cfg.train.seed, quantization)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    if cfg.peft.method != "none":
        model = attach_adapter(model, cfg.peft, cfg.task, cfg.train.gradient_checkpointing)
    return model


# --- one optimizer step ------------------------------------------------------------------


def optimizer_step(
    model,
    window: list[dict],
    spec: TaskSpec,
    accelerator: Accelerator,
    optimizer,
    scheduler,
    max_grad_norm: float,
) -> torch.Tensor:
    """Forward/backward over the accumulation window, then clip and step.

    The loss is normalised by the number of targets in the whole window on all processes:
    each micro-batch's summed loss is scaled so that, after Accelerate divides by the
    accumulation steps and DDP averages over processes, the gradient is that of
    sum(all target losses) / (all targets). Returns [loss sum, targets, tokens, grad norm]
    of this process (kept on the device: no host sync here)."""
    targets = sum(count_targets(b["labels"], spec.shifted_targets) for b in window)
    all_targets = accelerator.reduce(targets.clone(), "sum").clamp(min=1)
    scale = accelerator.num_processes * len(window) / all_targets
    loss_total = torch.zeros((), device=accelerator.device)
    grad_norm = torch.zeros((), device=accelerator.device)
    for batch in window:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                logits = model(**model_inputs(batch)).logits
            loss_sum, _ = spec.loss(logits, batch["labels"])
            accelerator.backward(loss_sum * scale)
            loss_total += loss_sum.detach()
            if accelerator.sync_gradients:
                norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
                grad_norm = norm.detach() if norm is not None else grad_norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if not accelerator.optimizer_step_was_skipped:
        scheduler.step()
    tokens = sum(b["attention_mask"].sum() for b in window)
    return torch.stack([loss_total, targets.float(), tokens.float(), grad_norm.float()])


# --- the run -----------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop works with, built by `set_up`."""

    cfg: RunConfig
    run_dir: Path
    accelerator: Accelerator
    spec: TaskSpec
    tokenizer: PreTrainedTokenizerBase
    label_names: list[str] | None
    train_set: datasets.Dataset
    validation_set: datasets.Dataset | None
    plan: BatchPlan
    total_steps: int
    collator: Callable
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def summary(self) -> dict:
        """What this run will do, printed at start and kept in run_summary.json."""
        parameters = list(self.model.parameters())
        total = sum(p.numel() for p in parameters)
        trainable = sum(p.numel() for p in parameters if p.requires_grad)
        return {
            "task": self.cfg.task,
            "processes": self.accelerator.num_processes,
            "train_examples": len(self.train_set),
            "validation_examples": len(self.validation_set or []),
            "global_batch_size": self.cfg.train.global_batch_size,
            "micro_batch_size": self.cfg.train.micro_batch_size,
            "accumulation_steps": self.plan.accumulation_steps,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "total_steps": self.total_steps,
            "parameters": total,
            "trainable_parameters": trainable,
            "trainable_share": round(trainable / total, 6),
            "peft": self.cfg.peft.method,
            "labels": self.label_names,
        }


def set_up(cfg: RunConfig) -> Run:
    """Read and check the data before loading the model (a bad row costs seconds, not a
    model download), then the model, optimizer and schedule, prepared by Accelerate."""
    run_dir = prepare_run_dir(cfg)
    world_size = world_size_from_env()
    accelerator = make_accelerator(cfg, run_dir, cfg.gradient_accumulation_steps(world_size))
    set_seed(cfg.train.seed)
    spec = TASKS[cfg.task]
    tokenizer = load_tokenizer(cfg.model, cfg.task)
    train_rows, validation_rows, label_names = read_splits(cfg)
    train_set = spec.encode(train_rows, tokenizer, label_names, cfg.data.max_length)
    validation_set = None
    if validation_rows is not None:
        validation_set = spec.encode(validation_rows, tokenizer, label_names, cfg.data.max_length)
    plan = BatchPlan(
        len(train_set),
        cfg.train.global_batch_size,
        cfg.train.micro_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        cfg.train.seed,
    )
    if plan.steps_per_epoch == 0:
        raise UserError(
            f"train.global_batch_size: {cfg.train.global_batch_size} is more than the "
            f"{len(train_set)} training examples; lower it or add data"
        )
    total_steps = cfg.train.max_steps or cfg.train.epochs * plan.steps_per_epoch

    model = build_model(cfg, tokenizer, label_names)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    return Run(
        cfg,
        run_dir,
        accelerator,
        spec,
        tokenizer,
        label_names,
        train_set,
        validation_set,
        plan,
        total_steps,
        spec.make_collator(tokenizer, cfg),
        model,
        optimizer,
        scheduler,
    )


def log_record(run: Run, step: int, since_log: torch.Tensor, seconds: float) -> dict:
    """One metrics.jsonl record from the sums since the last log (one all-reduce)."""
    loss_sum, targets, tokens = run.accelerator.reduce(since_log[:3].clone(), "sum")
    steps = step % run.cfg.log.every_steps or run.cfg.log.every_steps
    return {
        "step": step,
        "epoch": round(step / run.plan.steps_per_epoch, 4),
        "loss": (loss_sum / targets.clamp(min=1)).item(),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": since_log[3].item() / steps,
        "tokens_per_s": tokens.item() / max(seconds, 1e-9),
    }


def train(cfg: RunConfig) -> dict:
    """Run training as configured; returns the metrics written to eval_results.json."""
    run = set_up(cfg)
    accelerator, model = run.accelerator, run.model
    if accelerator.is_main_process:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        (run.run_dir / "run_summary.json").write_text(json.dumps(run.summary(), indent=2))
        accelerator.print(json.dumps(run.summary()))
    accelerator.wait_for_everyone()
    log = RunLog(accelerator, run.run_dir, cfg, run.total_steps)
    best = Best(cfg.eval_metric)

    def evaluate_and_keep_best(step: int) -> bool:
        """Evaluate, save the model when it is the best; True when early stopping says stop."""
        with log.paused():
            results = evaluate(
                model,
                run.validation_set,
                run.collator,
                run.spec,
                run.spec.make_metrics(run.label_names),
                accelerator,
                cfg.eval.batch_size,
                cfg.train.seed,
            )
            log.write(
                {
                    "step": step,
                    **{f"eval_{k}": v for k, v in results.items() if isinstance(v, float)},
                }
            )
            if best.update(results, step):
                save_model(accelerator, model, run.tokenizer, run.run_dir / "best", cfg)
        patience = cfg.eval.early_stopping_patience
        return bool(patience) and best.stale >= patience

    step, epoch, stop, evaluated_at = 0, 0, False, -1
    since_log = torch.zeros(4, device=accelerator.device)  # loss sum, targets, tokens, norm
    last_record, last_log_s = {}, 0.0
    has_validation = run.validation_set is not None
    model.train()
    while step < run.total_steps and not stop:
        loader = DataLoader(
            KeyedDataset(run.train_set, cfg.train.seed),
            batch_sampler=list(run.plan.micro_batches(epoch)),
            collate_fn=run.collator,
            pin_memory=accelerator.device.type == "cuda",
        )
        batches = iter(loader)
        for _ in range(run.plan.steps_per_epoch):
            window = [
                to_device(next(batches), accelerator.device)
                for _ in range(run.plan.accumulation_steps)
            ]
            since_log += optimizer_step(
                model,
                window,
                run.spec,
                accelerator,
                run.optimizer,
                run.scheduler,
                cfg.train.max_grad_norm,
            )
            step += 1

            # --- log: one all-reduce and one host sync every log.every_steps steps
            if step % cfg.log.every_steps == 0 or step == run.total_steps:
                now = log.elapsed()
                last_record = log_record(run, step, since_log, now - last_log_s)
                log.write({**last_record, "elapsed_s": round(now, 3)})
                log.show(step, last_record["loss"], last_record["lr"], last_record["tokens_per_s"])
                since_log.zero_()
                last_log_s = now

            # --- evaluate every eval.every_steps; save the full state every checkpoint
            if has_validation and cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                stop, evaluated_at = evaluate_and_keep_best(step), step
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                with log.paused():
                    save_training_state(
                        accelerator,
                        run.run_dir / "checkpoints" / f"step-{step}",
                        {"step": step, "epoch": epoch},
                    )
            if stop or step >= run.total_steps:
                break
        epoch += 1
        if has_validation and not cfg.eval.every_steps and evaluated_at != step:
            stop, evaluated_at = evaluate_and_keep_best(step), step
    if has_validation and evaluated_at != step:
        evaluate_and_keep_best(step)

    # --- final/: the best model by eval.metric (the last one without validation)
    if has_validation:
        if accelerator.is_main_process:
            (run.run_dir / "best").rename(run.run_dir / "final")
        results = {**best.results, "best_step": best.step, "metric": best.metric}
    else:
        save_model(accelerator, model, run.tokenizer, run.run_dir / "final", cfg)
        results = {"train_loss": last_record["loss"]}
    results["steps"] = step
    if accelerator.is_main_process:
        (run.run_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    log.close()  # ends the trackers and, under torchrun, the process group: last
    return results
