"""`trainer train`: set a run up, then one loop for every task, read top to bottom.

Set-up reads and checks the data before the model is loaded (a bad row costs seconds, not a
model download), derives gradient accumulation from the global batch, and writes the
resolved config. The loop runs optimizer steps over global batches (see sampling.py),
evaluates, keeps the best model, and leaves `final/`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from trainer.config import (
    LOWER_IS_BETTER,
    RunConfig,
    dump_yaml,
    parse_duration,
    to_dict,
    train_sources,
    world_size_from_env,
)
from trainer.data.augment import training_examples
from trainer.data.class_weights import resolve_class_weights, target_counts
from trainer.data.encode import Packer
from trainer.data.prepare import PreparedData, prepare_data, source_key
from trainer.data.sampling import (
    LENGTH_WINDOW_BATCHES,
    BatchPlan,
    KeyedDataset,
    LengthGrouped,
    Mixture,
    Shuffled,
    StreamPlan,
)
from trainer.data.stream import RowStream, SourceBlocks, TrainStream
from trainer.errors import UserError
from trainer.model.adapters import attach_adapter, quantization_config
from trainer.model.load import check_document_isolation, load_model, load_tokenizer
from trainer.run.checkpoint import TRAINER_STATE_NAME, load_checkpoint, save_checkpoint, save_model
from trainer.run.evaluation import evaluate
from trainer.run.forward import forward, to_device
from trainer.run.optim import build_optimizer, build_scheduler
from trainer.run.resume import (
    changed_keys,
    checkpoint_dir,
    rotate,
    select_checkpoint,
    truncate_metrics,
)
from trainer.run.stop import Preempted, StopFlag
from trainer.run.tracking import RunLog
from trainer.tasks.spec import TaskSpec, count_targets, task_spec


class RunFinished(Exception):
    """The output_dir already holds a finished run: nothing to do."""


# --- set-up ------------------------------------------------------------------------------


def _report(message: str) -> None:
    """A note from the main process before Accelerate is up (all ranks run the same checks)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stderr)


def prepare_run_dir(cfg: RunConfig) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None: start fresh); refuses
    to overwrite an earlier run's results or to resume under a changed run config."""
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    if (run_dir / "final").is_dir():
        raise RunFinished(f"run already finished: {run_dir / 'final'} exists; nothing to do")
    checkpoint = select_checkpoint(run_dir, cfg.train.resume, _report)
    if checkpoint is None and cfg.train.resume == "auto" and (run_dir / "metrics.jsonl").exists():
        raise UserError(
            f"output_dir: {run_dir} holds an unfinished run without a complete checkpoint; "
            "train.resume=never starts over (its files are kept aside)"
        )
    if checkpoint is not None:
        saved = json.loads((checkpoint / TRAINER_STATE_NAME).read_text())["config"]
        changed = changed_keys(saved, to_dict(cfg))
        if changed:
            raise UserError(
                f"train.resume: the run config differs from checkpoint {checkpoint.name} in "
                f"{', '.join(changed)}; restore them or use another output_dir"
            )
    return run_dir, checkpoint


def _set_aside_previous(run_dir: Path) -> None:
    """train.resume=never over an earlier run: keep its log and checkpoints, renamed."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("metrics.jsonl", "checkpoints", "eval_results.json", "best"):
        if (run_dir / name).exists():
            (run_dir / name).rename(run_dir / f"{name}.previous-{stamp}")


def make_accelerator(cfg: RunConfig, run_dir: Path, accumulation_steps: int) -> Accelerator:
    """Accelerate owns devices, processes, precision, accumulation and trackers."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),  # so that torchrun on CPU gives gloo DDP
        mixed_precision=cfg.train.precision,
        dynamo_backend="inductor" if cfg.train.compile else "no",
        gradient_accumulation_steps=accumulation_steps,
        log_with=list(cfg.log.trackers) or None,
        project_dir=str(run_dir),
    )
    if cfg.train.precision == "bf16" and accelerator.device.type == "cpu" and not _native_bf16():
        _report(
            "warning: train.precision=bf16 on a CPU without AVX-512 BF16 or AMX: bf16 matrix "
            "products are emulated (17x slower than fp32 in benchmarks/optimisations.py); "
            "train.precision=no is faster here"
        )
    if accelerator.num_processes != world_size_from_env():
        raise RuntimeError(  # ranks would overwrite each other's files: a launch bug
            f"WORLD_SIZE={world_size_from_env()} but Accelerate runs "
            f"{accelerator.num_processes} process(es)"
        )
    return accelerator


def _native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (torch's own checks)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


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
    model = load_model(cfg.model, cfg.head, tokenizer, label_names, cfg.train.seed, quantization)
    if cfg.data.isolate_documents:
        check_document_isolation(model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    if cfg.peft.method != "none":
        model = attach_adapter(model, cfg.peft, cfg.task, cfg.train.gradient_checkpointing)
    return model


# --- one optimizer step ------------------------------------------------------------------


@dataclass
class StepResult:
    """What one optimizer step reports: this process's sums [loss, targets, tokens, grad
    norm, positions] (on the device; positions count padding too), then [loss, targets] of
    each of the spec's extra heads, and decisions every process agreed on in one all-reduce."""

    sums: torch.Tensor
    skipped: bool  # non-finite loss or gradient norm on some process: no update
    requests: list[bool]  # the callers' flags, true when any process raised them


def optimizer_step(
    model,
    window: list[dict],
    spec: TaskSpec,
    accelerator: Accelerator,
    optimizer,
    scheduler,
    max_grad_norm: float,
    requests: tuple[bool, ...] = (),
    class_weights: torch.Tensor | None = None,
) -> StepResult:
    """Forward/backward over the accumulation window, then clip and step.

    The loss is normalised by the number of targets in the whole window on all processes:
    each micro-batch's summed loss is scaled so that, after Accelerate divides by the
    accumulation steps and DDP averages over processes, the gradient is that of
    sum(all target losses) / (all targets). Each extra head (NSP) is normalised the same
    way by its own targets and added. Before the update one all-reduce tells every
    process whether any saw a non-finite loss or gradient norm (then nobody steps) and
    whether any raised one of `requests` (stop, save). With `class_weights` the targets
    count by their class weight (see class_weights.py)."""
    device = accelerator.device
    heads = spec.extra_heads
    targets = sum(count_targets(b["labels"], spec.shifted_targets, class_weights) for b in window)
    head_counts = [sum(head.count(b) for b in window).float() for head in heads]
    counts = torch.stack([targets.float(), *head_counts])
    all_counts = accelerator.reduce(counts.clone(), "sum").clamp(min=1)
    scales = accelerator.num_processes * len(window) / all_counts
    totals = torch.zeros(len(counts), device=device)  # loss sums: the task's, each head's
    for batch in window:
        with accelerator.accumulate(model):
            with accelerator.autocast():
                output, labels = forward(model, batch, spec.targets_only)
            loss_sum, _ = spec.loss(output[spec.logits_key], labels, class_weights)
            parts = torch.stack([loss_sum, *(head.loss(output, batch)[0] for head in heads)])
            accelerator.backward((parts * scales).sum())
            totals += parts.detach()
    loss_total = totals[0]
    norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    grad_norm = norm.detach().float() if norm is not None else torch.zeros((), device=device)
    # fp16: the grad scaler handles inf gradients itself; only the loss counts then
    bad = ~torch.isfinite(totals).all()
    if accelerator.scaler is None:
        bad |= ~torch.isfinite(grad_norm)
    flags = torch.tensor([float(bad), *map(float, requests)], device=device)
    skipped, *raised = (accelerator.reduce(flags, "sum") > 0).tolist()
    if not skipped:
        optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(real_tokens(b) for b in window)
    positions = sum(b["input_ids"].numel() for b in window)
    sums = torch.stack(
        [loss_total, targets.float(), tokens.float(), grad_norm, tokens.new_tensor(positions)]
    )
    per_head = torch.stack([totals[1:], counts[1:]], dim=1).reshape(-1)
    sums = torch.cat([sums, per_head])
    return StepResult(torch.zeros_like(sums) if skipped else sums, skipped, raised)


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens that are not padding: a padded batch's attention mask says which; packed
    blocks (whose mask may be a 4-D document mask) have no padding."""
    mask = batch["attention_mask"]
    return mask.sum() if mask.dim() == 2 else mask.new_tensor(batch["input_ids"].numel())


# --- the run -----------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop works with, built by `set_up`."""

    cfg: RunConfig
    resume_from: Path | None
    run_dir: Path
    accelerator: Accelerator
    spec: TaskSpec
    tokenizer: PreTrainedTokenizerBase
    data: PreparedData
    # by (epoch, index): all sources in order, then any augmented variants; None streaming
    train_examples: KeyedDataset | None
    stream: TrainStream | None
    plan: BatchPlan | StreamPlan
    total_steps: int
    collator: Callable
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    class_weights: torch.Tensor | None

    @property
    def label_names(self) -> list[str] | None:
        """Class names in id order (classification and NER)."""
        return self.data.label_names

    @property
    def validation_set(self) -> datasets.Dataset | None:
        """Encoded validation examples, if the run has any."""
        return self.data.validation

    def train_batches(self, epoch: int, start_step: int) -> Iterator[dict]:
        """This process's micro-batches from (epoch, step) on: from the plan's keys, or
        from the stream (which continues from its own restored position)."""
        if self.stream is not None:
            return self.stream.micro_batches(self.cfg.train.micro_batch_size, self.collator)
        loader = DataLoader(
            self.train_examples,
            batch_sampler=list(self.plan.micro_batches(epoch, start_step)),
            collate_fn=self.collator,
            pin_memory=self.accelerator.device.type == "cuda",
            # its own generator: a DataLoader iterator otherwise draws its base seed from the
            # global RNG, and a run resumed mid-epoch would then see other dropout masks
            generator=torch.Generator(),
        )
        return iter(loader)

    def summary(self) -> dict:
        """What this run will do, printed at start and kept in run_summary.json."""
        parameters = list(self.model.parameters())
        total = sum(_logical_numel(p) for p in parameters)
        trainable = sum(p.numel() for p in parameters if p.requires_grad)
        sources = train_sources(self.cfg.data)
        sizes = [len(split) for split in self.data.train] or [None] * len(sources)
        return {
            "task": self.cfg.task,
            "processes": self.accelerator.num_processes,
            "train_examples": sum(sizes) if sizes[0] is not None else None,
            "examples_per_epoch": len(self.train_examples) if self.train_examples else None,
            "train_sources": [
                {"path": s.path, "weight": round(s.weight, 6), "examples": size}
                for s, size in zip(sources, sizes, strict=True)
            ],
            "validation_examples": len(self.validation_set or []),
            "data_cache": self.data.cache,
            "global_batch_size": self.cfg.train.global_batch_size,
            "micro_batch_size": self.cfg.train.micro_batch_size,
            "accumulation_steps": self.plan.accumulation_steps,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "total_steps": self.total_steps,
            "parameters": total,
            "trainable_parameters": trainable,
            "trainable_share": round(trainable / total, 6),
            "peft": self.cfg.peft.method,
            "attention": self.accelerator.unwrap_model(self.model).config._attn_implementation,
            "compiled": self.cfg.train.compile,
            "labels": self.label_names,
            "class_weights": None
            if self.class_weights is None
            else dict(zip(self.label_names, self.class_weights.tolist(), strict=True)),
        }


def _logical_numel(param: torch.nn.Parameter) -> int:
    """Parameters a tensor stands for: a 4-bit tensor packs two per stored byte."""
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else param.numel()


def batch_plan(
    cfg: RunConfig, data: PreparedData, examples: int, accelerator: Accelerator
) -> BatchPlan:
    """Global batches over the in-memory train `examples` (the encoded rows, then any
    augmented variants of them): one source shuffled, several mixed by weight, either
    regrouped by length when data.group_by_length is on (a variant counts with the length
    of its row)."""
    seed, batch = cfg.train.seed, cfg.train.global_batch_size
    sizes = tuple(len(split) for split in data.train)
    weights = tuple(source.weight for source in train_sources(cfg.data))
    ordering = Shuffled(examples, seed) if len(sizes) == 1 else Mixture(sizes, weights, seed)
    if cfg.data.group_by_length:
        lengths = [len(ids) for split in data.train for ids in split["input_ids"]]
        lengths *= examples // len(lengths)
        ordering = LengthGrouped(
            ordering, tuple(lengths), LENGTH_WINDOW_BATCHES * batch, batch, seed
        )
    plan = BatchPlan(
        ordering,
        batch,
        cfg.train.micro_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
    )
    if plan.steps_per_epoch == 0:
        raise UserError(
            f"train.global_batch_size: {batch} is more than the "
            f"{ordering.epoch_size} training examples; lower it or add data"
        )
    return plan


def train_stream(
    cfg: RunConfig, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, accelerator: Accelerator
) -> TrainStream:
    """The streamed train sources of data.train, this process's share of them."""
    sources = train_sources(cfg.data)
    rank, world = accelerator.process_index, accelerator.num_processes
    blocks = [
        SourceBlocks(
            RowStream(s.path, source_key(i, len(sources)), cfg.data, rank, world, cfg.train.seed),
            lambda texts: spec.documents(tokenizer, texts),
            Packer(cfg.data.max_length),
        )
        for i, s in enumerate(sources)
    ]
    weights = [s.weight for s in sources]
    return TrainStream(blocks, weights, cfg.data.shuffle_buffer, cfg.train.seed, rank)


def set_up(cfg: RunConfig) -> Run:
    """Read and check the data before loading the model (a bad row costs seconds, not a
    model download), then the model, optimizer and schedule, prepared by Accelerate."""
    run_dir, resume_from = prepare_run_dir(cfg)
    world_size = world_size_from_env()
    accelerator = make_accelerator(cfg, run_dir, cfg.gradient_accumulation_steps(world_size))
    if resume_from is None and cfg.train.resume == "never" and accelerator.is_main_process:
        _set_aside_previous(run_dir)
    set_seed(cfg.train.seed)
    spec = task_spec(cfg)
    data, tokenizer = prepare_data(cfg, lambda: load_tokenizer(cfg.model, cfg.task))
    weights = None
    if data.label_names is not None and cfg.data.class_weights != "none":
        counts = target_counts(data.train, data.label_names)  # a pass over every label
        weights = resolve_class_weights(cfg.data.class_weights, counts, data.label_names)
    if cfg.data.streaming:
        stream, examples = train_stream(cfg, spec, tokenizer, accelerator), None
        plan = StreamPlan(cfg.gradient_accumulation_steps(world_size), cfg.train.max_steps)
    else:
        examples = training_examples(datasets.concatenate_datasets(data.train), tokenizer, cfg)
        stream, plan = None, batch_plan(cfg, data, len(examples), accelerator)
    total_steps = cfg.train.max_steps or cfg.train.epochs * plan.steps_per_epoch

    model = build_model(cfg, tokenizer, data.label_names)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    return Run(
        cfg,
        resume_from,
        run_dir,
        accelerator,
        spec,
        tokenizer,
        data,
        examples,
        stream,
        plan,
        total_steps,
        spec.make_collator(tokenizer, cfg),
        model,
        optimizer,
        scheduler,
        None if weights is None else torch.tensor(weights, device=accelerator.device),
    )


def log_record(run: Run, step: int, since_log: torch.Tensor, seconds: float) -> dict:
    """One metrics.jsonl record from the sums since the last log (one all-reduce). With
    extra heads, `loss` is the objective (the sum of the parts), each part logged too."""
    reduced = run.accelerator.reduce(torch.cat([since_log[:3], since_log[4:]]), "sum")
    tokens, positions = reduced[2], reduced[3]
    steps = step % run.cfg.log.every_steps or run.cfg.log.every_steps
    record = {
        "step": step,
        # a stream has no epochs: its passes over each source are per process
        "epoch": round(step / run.plan.steps_per_epoch, 4) if run.stream is None else None,
        **_losses(run.spec, reduced[0:2], reduced[4:].view(-1, 2)),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": since_log[3].item() / steps,
        "tokens": int(tokens.item()),  # real (non-padding) tokens trained since the last log
        "tokens_per_s": tokens.item() / max(seconds, 1e-9),
        "pad_fraction": 1 - tokens.item() / positions.item() if positions > 0 else 0.0,
    }
    if run.accelerator.device.type == "cuda":  # this process's peak since the start
        record["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return record


def _losses(spec: TaskSpec, own: torch.Tensor, heads: torch.Tensor) -> dict[str, float]:
    """`loss` from [loss sum, targets] of the task and of each extra head: the task's mean,
    or with extra heads the sum of the means, each also logged by name (mlm_loss, nsp_loss).
    No targets means every step since the last log was skipped as non-finite: NaN."""
    means = [(s / n).item() if n > 0 else math.nan for s, n in [own, *heads]]
    if not spec.extra_heads:
        return {"loss": means[0]}
    names = [spec.own_loss_name, *(head.name for head in spec.extra_heads)]
    return {"loss": sum(means), **{f"{n}_loss": m for n, m in zip(names, means, strict=True)}}


class TrainingFailed(Exception):
    """Training stopped on a fault it cannot train through (non-finite values, a failed save)."""


@dataclass
class LoopState:
    """The loop's position and memory: saved in every checkpoint, the same on all ranks."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    evaluated_at: int = -1
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0
    train_loss: float | None = None
    best: dict = field(default_factory=dict)


def _start(run: Run) -> tuple[LoopState, Best, torch.Tensor]:
    """Fresh state, or the state of the checkpoint being resumed (metrics.jsonl is cut
    back to that step, so the continued log has no duplicated or missing steps)."""
    state, best = LoopState(), Best(run.cfg.eval_metric)
    since_log = torch.zeros(5 + 2 * len(run.spec.extra_heads), device=run.accelerator.device)
    if run.resume_from is None:
        return state, best, since_log
    saved, mine = load_checkpoint(run.accelerator, run.resume_from, run.scheduler)
    state = LoopState(**saved["loop"])
    best = Best(**state.best) if state.best else best
    since_log = torch.tensor(mine["since_log"], device=run.accelerator.device)
    if run.stream is not None:
        run.stream.load_state_dict(mine["stream"])
    if run.accelerator.is_main_process:
        truncate_metrics(run.run_dir / "metrics.jsonl", state.step)
        print(f"resuming from {run.resume_from} (step {state.step})", file=sys.stderr)
    return state, best, since_log


def _checkpoint(run: Run, state: LoopState, best: Best, since_log: torch.Tensor) -> None:
    """Save a checkpoint of this step, then drop the ones beyond checkpoint.keep_last."""
    state.best = dataclasses.asdict(best)
    folder = checkpoint_dir(run.run_dir, state.step)
    loop = {"loop": dataclasses.asdict(state), "config": to_dict(run.cfg)}
    mine = {"since_log": since_log.tolist()}
    if run.stream is not None:
        mine["stream"] = run.stream.state_dict()  # exact: taken after the step's last batch
    try:
        save_checkpoint(run.accelerator, folder, run.scheduler, loop, mine)
    except OSError as err:
        raise TrainingFailed(
            f"could not write checkpoint {folder}: {err.strerror or err}; "
            "the previous checkpoint is intact"
        ) from None
    if run.accelerator.is_main_process:
        keep = {checkpoint_dir(run.run_dir, best.step).resolve()}
        for old in rotate(run.run_dir, run.cfg.checkpoint.keep_last, keep):
            shutil.rmtree(old, ignore_errors=True)


def train(cfg: RunConfig) -> dict:
    """Run training as configured; returns the metrics written to eval_results.json."""
    run = set_up(cfg)
    accelerator, model = run.accelerator, run.model
    if accelerator.is_main_process:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        (run.run_dir / "config.yaml").write_text(dump_yaml(cfg))
        (run.run_dir / "run_summary.json").write_text(json.dumps(run.summary(), indent=2))
        accelerator.print(json.dumps(run.summary()))
        if cfg.model.trust_remote_code:
            print(
                "warning: model.trust_remote_code is on: code from the model repo runs here",
                file=sys.stderr,
            )
    accelerator.wait_for_everyone()
    state, best, since_log = _start(run)
    log = RunLog(accelerator, run.run_dir, cfg, run.total_steps, state.step)
    stop_flag = StopFlag(parse_duration(cfg.train.max_time) if cfg.train.max_time else None)
    stop_flag.install()
    last_save, last_log_s = time.monotonic(), 0.0
    has_validation = run.validation_set is not None

    def evaluate_and_keep_best() -> bool:
        """Evaluate, save the model when it is the best; True when early stopping says stop."""
        state.evaluated_at = state.step
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
                    "step": state.step,
                    **{f"eval_{k}": v for k, v in results.items() if isinstance(v, float)},
                }
            )
            if best.update(results, state.step):
                save_model(accelerator, model, run.tokenizer, run.run_dir / "best", cfg)
        patience = cfg.eval.early_stopping_patience
        return bool(patience) and best.stale >= patience

    early_stop = False
    model.train()
    while state.step < run.total_steps and not early_stop:
        batches = run.train_batches(state.epoch, state.step_in_epoch)
        while state.step_in_epoch < run.plan.steps_per_epoch:
            window = [
                to_device(next(batches), accelerator.device)
                for _ in range(run.plan.accumulation_steps)
            ]
            minutes = cfg.checkpoint.every_minutes
            save_due_by_time = bool(minutes) and time.monotonic() - last_save > 60 * minutes
            result = optimizer_step(
                model,
                window,
                run.spec,
                accelerator,
                run.optimizer,
                run.scheduler,
                cfg.train.max_grad_norm,
                (stop_flag.requested(), save_due_by_time),
                run.class_weights,
            )
            stop_requested, save_due_by_time = result.requests
            since_log += result.sums
            state.step += 1
            state.step_in_epoch += 1

            # --- faults: a non-finite step was skipped on every process
            if result.skipped:
                state.skipped_steps += 1
                state.nonfinite_in_a_row += 1
                if (
                    cfg.train.on_nonfinite == "stop"
                    or state.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row
                ):
                    _checkpoint(run, state, best, since_log)
                    raise TrainingFailed(
                        f"non-finite loss or gradient norm at step {state.step} "
                        f"({state.nonfinite_in_a_row} in a row, train.on_nonfinite="
                        f"{cfg.train.on_nonfinite}); checkpoint saved"
                    )
            else:
                state.nonfinite_in_a_row = 0

            # --- log: one all-reduce and one host sync every log.every_steps steps
            if state.step % cfg.log.every_steps == 0 or state.step == run.total_steps:
                now = log.elapsed()
                record = log_record(run, state.step, since_log, now - last_log_s)
                record["skipped_steps"] = state.skipped_steps
                state.train_loss = record["loss"]
                log.write({**record, "elapsed_s": round(now, 3)})
                log.show(state.step, record["loss"], record["lr"], record["tokens_per_s"])
                since_log.zero_()
                last_log_s = now

            # --- evaluate; checkpoint on schedule, on request, and before stopping
            every = cfg.eval.every_steps
            if has_validation and every and state.step % every == 0:
                early_stop = evaluate_and_keep_best()
            every = cfg.checkpoint.every_steps
            if (every and state.step % every == 0) or save_due_by_time or stop_requested:
                with log.paused():
                    _checkpoint(run, state, best, since_log)
                last_save = time.monotonic()
            if stop_requested:
                _leave_for_requeue(run, stop_flag.reason or "a signal on another process")
            if early_stop or state.step >= run.total_steps:
                break
        if state.step_in_epoch >= run.plan.steps_per_epoch:
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
            if has_validation and not cfg.eval.every_steps and state.evaluated_at != state.step:
                early_stop = evaluate_and_keep_best()
    if has_validation and state.evaluated_at != state.step:
        evaluate_and_keep_best()
    results = _finish(run, best, state)
    log.close()  # ends the trackers and, under torchrun, the process group: last
    return results


def _leave_for_requeue(run: Run, reason: str) -> None:
    """After the checkpoint: stop with EXIT_PREEMPTED. Requeueing is the launcher's business
    (launch/requeue.py): the same words fit a laptop, a container and a cluster job."""
    run.accelerator.end_training()
    raise Preempted(f"stopped by {reason} at a saved checkpoint; run the same command to resume")


def _finish(run: Run, best: Best, state: LoopState) -> dict:
    """final/: the best model by eval.metric (the last one without validation)."""
    accelerator = run.accelerator
    if run.validation_set is not None:
        if accelerator.is_main_process:
            (run.run_dir / "best").rename(run.run_dir / "final")
        results = {**best.results, "best_step": best.step, "metric": best.metric}
    else:
        save_model(accelerator, run.model, run.tokenizer, run.run_dir / "final", run.cfg)
        results = {"train_loss": state.train_loss}
    results |= {"steps": state.step, "skipped_steps": state.skipped_steps}
    if accelerator.is_main_process:
        (run.run_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return results
