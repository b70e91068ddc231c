"""Setting a run up: the run directory and what it resumes from, Accelerate, the data (read
and checked before the model is loaded: a bad row costs seconds, not a model download),
the batch plan, the model (full, LoRA or QLoRA), optimizer and schedule.

Gradient accumulation is derived from the global batch, so the same run config trains the
same global batches on any number of processes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    InitProcessGroupKwargs,
    broadcast_object_list,
    parse_flag_from_env,
    set_seed,
)
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from trainer.config import RunConfig, to_dict, world_size_from_env
from trainer.data.augment import training_examples
from trainer.data.class_weights import resolve_class_weights, target_counts
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
from trainer.data.sources import train_sources
from trainer.data.stream import ShardSource, ShardStream, TrainStream
from trainer.devices import cpu_only
from trainer.errors import UserError
from trainer.logs import get_logger
from trainer.model import dtypes
from trainer.model.adapters import attach_adapter, quantization_config
from trainer.model.card import finished_run_card, write_card
from trainer.model.load import (
    check_document_isolation,
    check_max_length,
    load_model,
    load_tokenizer,
    warn_random_head,
)
from trainer.run.checkpoint import check_layout, promote_best, recover_replaced
from trainer.run.optim import HeadWarmup, build_optimizer, build_scheduler, head_warmup
from trainer.run.resume import (
    COMMIT_NAME,
    config_change_problem,
    finished_run_problem,
    read_loop_state,
    select_checkpoint,
    step_folders,
)
from trainer.run.rundir import claim_run_dir
from trainer.run.tracker_runs import TRACKER_RUNS, log_with
from trainer.tasks.registry import task_spec
from trainer.tasks.spec import Objective, TaskSpec
from trainer.yaml_sections import read_yaml

logger = get_logger(__name__)


class RunFinished(Exception):
    """The output_dir already holds a finished run: nothing to do."""


def prepare_run_dir(cfg: RunConfig, accelerator: Accelerator) -> tuple[Path, Path | None]:
    """The run directory and the checkpoint to resume from (None: start fresh); refuses
    to overwrite an earlier run's results or to resume under a changed run config. The
    main process decides and the others take its answer: every process hashing the same
    multi-GB checkpoint would multiply the cost of a start by the processes on a node."""
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    answer: list = [None]
    if accelerator.is_main_process:
        try:
            answer = [_resume_point(cfg, run_dir)]
        except (RunFinished, UserError) as stop:
            answer = [stop]
    if accelerator.num_processes > 1:
        broadcast_object_list(answer)
    if isinstance(answer[0], Exception):
        raise answer[0]
    return run_dir, answer[0]


def _resume_point(cfg: RunConfig, run_dir: Path) -> Path | None:
    """`prepare_run_dir` on the main process: also repairs what a kill left (a `best/`
    replaced halfway, a finish halfway). An earlier run's files, when the run starts over,
    are set aside by `set_up` at its end, so that a bad input found on the way (a data
    file, data.max_length) leaves them where they were."""
    recover_replaced(run_dir / "best")
    starting_over = cfg.train.resume == "never"  # a finished run too: set aside at the end
    if not starting_over and ((run_dir / "final").is_dir() or _complete_finish(run_dir)):
        if (run_dir / "config.yaml").is_file():
            saved = read_yaml(run_dir / "config.yaml")
            if problem := finished_run_problem(saved, to_dict(cfg), run_dir):
                raise UserError(problem)
        raise RunFinished(f"run already finished: {run_dir / 'final'} exists; nothing to do")
    skipped: list[str] = []  # one line each, or part of the one error line
    checkpoint = select_checkpoint(run_dir, cfg.train.resume, skipped.append)
    if checkpoint is None and cfg.train.resume == "auto" and (run_dir / "metrics.jsonl").exists():
        if any(_was_committed(folder) for _, folder in step_folders(run_dir)):
            raise UserError(
                f"output_dir: {run_dir} holds an unfinished run without a complete checkpoint "
                f"({'; '.join(skipped)}); train.resume=never starts over (its files are kept aside)"
            )
        skipped.append(f"{run_dir} holds a run stopped before its first checkpoint: starting over")
    for line in skipped:
        logger.warning(line)  # all ranks run these checks: the logger speaks for the main one
    if checkpoint is None:  # an earlier run's files are set aside once set_up has succeeded
        return None
    saved = read_loop_state(checkpoint)["config"]
    problem = config_change_problem(saved, to_dict(cfg), checkpoint.name)
    if problem:
        raise UserError(problem)
    return checkpoint


def _was_committed(folder: Path) -> bool:
    """A checkpoint that was complete once (renamed into place, or with its marker), even if
    damaged now: a run that reached it is not started over without being asked."""
    return not folder.name.endswith(".partial") or (folder / COMMIT_NAME).exists()


def _complete_finish(run_dir: Path) -> bool:
    """Finishing writes eval_results.json first, then best/'s card, then renames best/ to
    final/ (see train._finish): after a kill in between, write the card and do the rename.
    Without a best/ the final model was the last one, which only training again can give
    back."""
    try:
        results = json.loads((run_dir / "eval_results.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if not isinstance(results.get("best_step"), int) or not (run_dir / "best").is_dir():
        return False
    if (run_dir / "config.yaml").is_file():  # the card's source; again: it may predate the kill
        write_card(run_dir / "best", finished_run_card(run_dir))
    promote_best(run_dir)
    logger.info("completed the interrupted finish of %s: best/ is final/", run_dir)
    return True


def _set_aside_previous(run_dir: Path) -> None:
    """Starting over an earlier run: keep its log and checkpoints, renamed."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (
        "metrics.jsonl",
        "samples.jsonl",
        "checkpoints",
        "eval_results.json",
        "best",
        "final",
        TRACKER_RUNS,
    ):
        if (run_dir / name).exists():
            (run_dir / name).rename(run_dir / f"{name}.previous-{stamp}")


def make_accelerator(cfg: RunConfig, run_dir: Path, accumulation_steps: int) -> Accelerator:
    """Accelerate owns devices, processes, precision, accumulation and trackers."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise UserError("train.precision: fp16 needs a CUDA GPU; use bf16 or no on this machine")
    accelerator = Accelerator(
        # cpu=True so that torchrun on CPU gives gloo DDP; but Accelerate then ignores a
        # DeepSpeed launch, which on CPU runs on DeepSpeed's own CPU accelerator
        cpu=cpu_only() and not parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"),
        mixed_precision=cfg.train.precision,
        dynamo_backend="inductor" if cfg.train.compile else "no",
        gradient_accumulation_steps=accumulation_steps,
        log_with=log_with(cfg, run_dir),
        project_dir=str(run_dir),
        # torch's default is 30 minutes: a rank that never joins a collective (hung, or
        # dead without its process group noticing) should fail the job much sooner
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout))
        ],
    )
    if cfg.train.precision == "bf16" and accelerator.device.type == "cpu" and not _native_bf16():
        logger.warning(
            "train.precision=bf16 on a CPU without AVX-512 BF16 or AMX: bf16 matrix "
            "products are emulated (17x slower than fp32 in benchmarks/optimisations.py); "
            "train.precision=no is faster here"
        )
    _fill_deepspeed_auto(accelerator, cfg)
    if accelerator.num_processes != world_size_from_env():
        raise RuntimeError(  # ranks would overwrite each other's files: a launch bug
            f"WORLD_SIZE={world_size_from_env()} but Accelerate runs "
            f"{accelerator.num_processes} process(es)"
        )
    return accelerator


def _fill_deepspeed_auto(accelerator: Accelerator, cfg: RunConfig) -> None:
    """A user's DeepSpeed JSON (`accelerate launch --config_file`) may say "auto": Accelerate
    takes the micro batch from the dataloaders given to prepare(), which this loop keeps to
    itself, and puts 1.0 for the clipping; take both from the run config instead."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    values = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_clipping": cfg.train.max_grad_norm,
    }
    for key, value in values.items():
        if plugin.is_auto(key):
            plugin.deepspeed_config[key] = value


def _native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (torch's own checks)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def build_model(
    cfg: RunConfig,
    spec: TaskSpec,
    tokenizer: PreTrainedTokenizerBase,
    label_names,
    sharded: bool = False,
) -> torch.nn.Module:
    """The model to train: full, or the base (4-bit for QLoRA) wrapped with a LoRA adapter,
    in the dtypes of trainer/model/dtypes.py. `sharded`: FSDP or ZeRO-3 shard the weights,
    so a 4-bit base is stored in its float dtype (adapters.quantization_config)."""
    dtype = dtypes.base_dtype(cfg.model.dtype, cfg.peft.method, cfg.train.precision)
    quantization = None
    if cfg.peft.method == "qlora":
        quantization = quantization_config(cfg.train.precision, dtype if sharded else None)
    model = load_model(
        cfg.model, spec, tokenizer, label_names, cfg.train.seed, quantization, dtype=dtype
    )
    if not spec.has_labels:  # a classifier's head is new by design; a language model's not
        consequence = "training starts from chance (a perplexity near the vocabulary size)"
        warn_random_head(
            model, f"model.name_or_path: {cfg.model.name_or_path}", spec.name, consequence
        )
    if cfg.data.isolate_documents or cfg.data.packing:
        check_document_isolation(model)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
    if cfg.peft.method != "none":
        model = attach_adapter(
            model, cfg.peft, spec, cfg.train.gradient_checkpointing, sharded, cfg.model.revision
        )
        dtypes.keep_trained_in_fp32(model)
    return model


def shards_weights(accelerator: Accelerator) -> bool:
    """Whether the backend shards the weights themselves: FSDP, or DeepSpeed ZeRO-3."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return accelerator.distributed_type == DistributedType.DEEPSPEED and plugin.zero_stage == 3


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
    head_warmup: HeadWarmup
    objective: Objective | None = None  # the spec's, when it has one (preference pairs)

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
        trainable = sum(_logical_numel(p) for p in parameters if p.requires_grad)
        sources = train_sources(self.cfg.data)
        sizes = [len(split) for split in self.data.train] or [None] * len(sources)
        return {
            "task": self.cfg.task,
            "processes": self.accelerator.num_processes,
            "distributed_type": self.accelerator.distributed_type.value,  # NO, DEEPSPEED, FSDP..
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
            **self.head_warmup.summary(),
            **self._dropped(),
        }

    def _dropped(self) -> dict:
        """Rows dropped on the way to a batch, when there were any."""
        return {"dropped_rows": self.data.dropped_rows} if self.data.dropped_rows else {}


def _logical_numel(param: torch.nn.Parameter) -> int:
    """Parameters a tensor stands for: a 4-bit tensor packs two per stored byte, and under
    ZeRO-3 a parameter holds only its partition (`ds_numel` is the whole)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None:
        return quant_state.shape.numel()
    return getattr(param, "ds_numel", None) or param.numel()


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
    """The streamed train sources of data.train, this process's share of them: one shard
    per process (a resumed run deals the saved shards out again, see data/stream.py)."""
    sources = train_sources(cfg.data)
    weights = [s.weight for s in sources]

    def shard(index: int, count: int) -> ShardStream:
        seed = cfg.train.seed
        blocks = [
            spec.stream_blocks(
                tokenizer,
                cfg.data,
                ShardSource(s.path, source_key(i, len(sources)), index, count, seed),
            )
            for i, s in enumerate(sources)
        ]
        return ShardStream(blocks, weights, cfg.data.shuffle_buffer, seed, index)

    world, rank = accelerator.num_processes, accelerator.process_index
    return TrainStream(shard, cfg.train.global_batch_size, world, rank)


def _checked_tokenizer(cfg: RunConfig, spec: TaskSpec) -> PreTrainedTokenizerBase:
    """The tokenizer, once the model is known to take data.max_length tokens: prepare_data
    loads it after checking the rows and before encoding them."""
    check_max_length(cfg.model, cfg.data.max_length)
    return load_tokenizer(cfg.model, spec)


def set_up(cfg: RunConfig) -> Run:
    """Read and check the data before loading the model (a bad row costs seconds, not a
    model download), then the model, optimizer and schedule, prepared by Accelerate."""
    world_size = world_size_from_env()
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    accelerator = make_accelerator(cfg, run_dir, cfg.gradient_accumulation_steps(world_size))
    claim_run_dir(accelerator, run_dir)  # before any process decides to resume
    run_dir, resume_from = prepare_run_dir(cfg, accelerator)
    if resume_from is not None:
        check_layout(resume_from, accelerator)
    set_seed(cfg.train.seed)
    spec = task_spec(cfg)
    data, tokenizer = prepare_data(cfg, lambda: _checked_tokenizer(cfg, spec))
    if data.label_names is not None:  # after a cache hit too: the tag scheme is no cache key
        spec.rows.check_names(data.label_names, cfg.data)
    weights = None
    if data.label_names is not None and cfg.data.class_weights != "none":
        counts = target_counts(data.train, data.label_names)  # a pass over every label
        weights = resolve_class_weights(cfg.data.class_weights, counts, data.label_names)
    sharded = shards_weights(accelerator)
    model = build_model(cfg, spec, tokenizer, data.label_names, sharded)
    objective = None  # before `prepare` and the examples: it may score the encoded data
    if spec.make_objective is not None:
        objective = spec.make_objective(cfg, model, accelerator.device, sharded, data)
    if cfg.data.streaming:
        stream, examples = train_stream(cfg, spec, tokenizer, accelerator), None
        plan = StreamPlan(cfg.gradient_accumulation_steps(world_size), cfg.train.max_steps)
    else:
        examples = training_examples(datasets.concatenate_datasets(data.train), tokenizer, cfg)
        stream, plan = None, batch_plan(cfg, data, len(examples), accelerator)
    total_steps = cfg.train.max_steps or cfg.train.epochs * plan.steps_per_epoch
    warmup = head_warmup(model, cfg.train, spec.head_warmup_ratio, total_steps)
    optimizer = build_optimizer(model, cfg.train, frozenset(warmup.names))
    scheduler = build_scheduler(optimizer, cfg.train, total_steps, warmup.steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if spec.after_prepare is not None and spec.after_prepare(cfg, model, accelerator, data):
        examples = training_examples(datasets.concatenate_datasets(data.train), tokenizer, cfg)
    if resume_from is None and accelerator.is_main_process:
        _set_aside_previous(run_dir)  # only now: a bad input found above leaves them as they were
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
        warmup,
        objective,
    )
