"""`trainer plan`: what a run config does on a cluster profile, before anything is started.

It prints the batch arithmetic, the number of optimizer steps (the train split is read and
encoded with the model's tokenizer; no weights are loaded), the exact DeepSpeed JSON or FSDP
settings `trainer launch` writes (from launch.accelerate_config), and an estimate of the
memory each device needs, for the chosen strategy and its alternatives side by side.

Parameters are counted on the meta device (`AutoModelFor*.from_config` under
`torch.device("meta")`: shapes, no storage); LoRA adapters are attached there with peft, as
training attaches them, so the trainable count is peft's own.

Bytes per parameter (AdamW; the ZeRO paper's accounting, Rajbhandari et al. 2020). The
weights' dtypes follow model.dtype as training resolves it (trainer/model/dtypes.py: fp32
trained weights unless model.dtype asks for 16 bits; a frozen LoRA base in train.precision's
dtype; 'auto': the checkpoint config's dtype), t = the trained weights' width, f = the frozen:

- DeepSpeed at bf16/fp16: the engine casts the module to 16 bits and keeps an fp32 master
  copy: weights 2 x every parameter, gradients 2 x trainable, optimizer (4 master + 8 Adam
  m and v) x trainable.
- otherwise (torch autocast under ddp / fsdp, or precision `no`): weights t x trainable +
  f x frozen, gradients t x trainable, optimizer 2t x trainable (torch's AdamW keeps m and v
  in the parameter's dtype; no master copy: fp32 weights are their own). Default fp32 full
  fine-tuning: 4 + 4 + 8 = 16 bytes, the same total as mixed precision, split otherwise.
- QLoRA: the quantized Linear weights take 0.5 + 0.0159 bytes (NF4 plus double-quantized
  absmax: an 8-bit constant per 64 weights and an fp32 one per 256 such blocks); the other
  frozen weights f when sharded (FSDP, ZeRO-3: the 4-bit base is stored in that dtype), 4
  otherwise (peft's k-bit preparation upcasts them to fp32).

Sharding divides by the world size: ZeRO-1 the optimizer states, ZeRO-2 also gradients,
ZeRO-3 also weights. FSDP runs as FSDP2 (launch.accelerate_config.fsdp_settings): FULL_SHARD
is ZeRO-3, SHARD_GRAD_OP (reshard_after_forward false: each unit's gathered weights stay from
its forward to its backward) ZeRO-2, HYBRID_SHARD ZeRO-3 within one node (divides by
processes_per_node); NO_SHARD is refused (it is DDP). Offload puts the optimizer states and
the gradients (offload_optimizer: they go to the host bucket by bucket as they are reduced)
and the weights (offload_params) in CPU memory: 0 on the device. Not counted: the CUDA
context, communication buckets, ZeRO-3's gathered layers in flight, allocator fragmentation.
Sharded QLoRA divides the 4-bit base like any weights.

Host (CPU) memory per node, for the model states (DeepSpeed's estimator's accounting,
checked against it in tests/test_plan_deepspeed_estimator.py; it adds 50% on top for pinned
buffers and the like, additional_buffer_factor 1.5; the processes themselves are not counted):

- loading        from_pretrained materializes the weights in fp32 (4 bytes) on the host
                 before they move to the device: in every process (ddp, ZeRO-1/2); in one
                 per node (FSDP with cpu_ram_efficient_loading); under ZeRO-3's zero.Init
                 one layer at a time per process (the largest module's own parameters).
- offloaded      offload_optimizer: 16 bytes per trained parameter (DeepSpeed's CPU Adam
                 keeps its own fp32 copy, m and v, and the fp32 gradients, in any precision),
                 the node's share of the partitions; offload_params: the node's share of the
                 weights, w bytes each.
- per node       offloaded weights + the larger of loading and the offloaded optimizer
                 (the loaded copy is freed once on the device, before the optimizer exists).

Activations per device (Korthikanti et al. 2022, "Reducing Activation Recomputation in
Large Transformer Models", 16-bit activations, no sequence parallelism), with micro batch b,
sequence s = data.max_length, hidden h, heads a, layers L:

- one layer      s·b·h·34 + 5·a·s²·b bytes (the second term: attention scores, softmax and
                 its dropout mask, which fused SDPA / flash attention kernels do not store:
                 an upper bound).
- the model      L x one layer; with gradient checkpointing (train.gradient_checkpointing or
                 the profile's fsdp.activation_checkpointing) each layer keeps only its input,
                 2·s·b·h bytes, and one layer is recomputed at a time: L·2·s·b·h + one layer.
- fp32           twice the above when train.precision is `no`.
- LM logits      mlm / clm / sft add s·b·V·4 bytes (V the vocabulary) for the fp32 logits
                 the loss reads.

The same activations stand in every row: sharding does not change them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from launch.accelerate_config import (
    accelerate_config,
    deepspeed_config,
    fsdp_settings,
)
from launch.counting import DataCount, ParamCount, count_examples, count_parameters
from launch.job import Job, checked_job
from launch.profiles import ClusterProfile
from trainer.config import RunConfig
from trainer.errors import UserError
from trainer.model import dtypes
from trainer.tasks.registry import TASKS

ADAM_STATE_BYTES = 8  # Adam m and v, fp32
MASTER_COPY_BYTES = 4  # fp32 weights kept by the optimizer under mixed precision
QLORA_BYTES = 0.5 + (8 / 64 + 32 / (64 * 256)) / 8  # NF4 + double-quantized absmax
LAYER_BYTES_PER_TOKEN_AND_WIDTH = 34  # Korthikanti et al., 16-bit activations
ATTENTION_BYTES = 5  # x heads x seq² x micro batch, per layer
LOAD_BYTES = 4  # fp32: the weights as from_pretrained materializes them in host memory
# DeepSpeed's CPU Adam steps its own fp32 copy of the partition with fp32 gradients copied
# to the host, whatever train.precision: master copy + m and v + gradients
OFFLOADED_OPTIMIZER_BYTES = MASTER_COPY_BYTES + ADAM_STATE_BYTES + 4


# --- memory per device ---------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """How one backend spreads the training state: by how many processes the weights,
    gradients and optimizer states are divided, and what lives in CPU memory."""

    name: str
    weight_shards: int = 1
    grad_shards: int = 1
    optimizer_shards: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    # who holds the weights in host memory while the model loads: every "process"; one per
    # "node" (FSDP's cpu_ram_efficient_loading: local rank 0 loads, the others get them
    # from it); ZeRO-3's zero.Init partitions at construction, so one "layer" per process
    load: str = "process"


def _fsdp_strategy(profile: ClusterProfile) -> Strategy:
    """The FSDP2 row, as fsdp_settings configures it: FULL_SHARD reshards after forward
    (ZeRO-3), SHARD_GRAD_OP keeps each unit's gathered weights from its forward to its
    backward, so the peak holds them all (ZeRO-2), HYBRID_SHARD shards within a node
    (ZeRO-3 over processes_per_node). NO_SHARD is refused by the profile (it is DDP)."""
    sharding = profile.fsdp.sharding_strategy if profile.backend == "fsdp" else "FULL_SHARD"
    world, node = profile.world_size, profile.processes_per_node
    shards = {
        "FULL_SHARD": (world, world, world),
        "SHARD_GRAD_OP": (1, world, world),
        "HYBRID_SHARD": (node, node, node),
    }[sharding]
    name = "fsdp" if sharding == "FULL_SHARD" else f"fsdp {sharding}"
    return Strategy(name, *shards, load="node")


def alternative_strategies(profile: ClusterProfile) -> list[Strategy]:
    """The rows of the memory table, for this profile's number of processes."""
    world = profile.world_size
    return [
        Strategy("ddp"),
        Strategy("zero1", 1, 1, world),
        Strategy("zero2", 1, world, world),
        Strategy("zero3", world, world, world, load="layer"),
        Strategy("zero3+offload", world, world, world, True, True, load="layer"),
        _fsdp_strategy(profile),
    ]


def chosen_strategy(profile: ClusterProfile) -> Strategy:
    """The strategy this profile runs."""
    if profile.backend == "fsdp":
        return _fsdp_strategy(profile)
    if profile.backend == "ddp":
        return Strategy("ddp")
    stage, world = profile.zero_stage, profile.world_size
    shards = (world if stage == 3 else 1, world if stage >= 2 else 1, world)
    if profile.offload_optimizer and profile.offload_params:
        suffix = "+offload"
    elif profile.offload_optimizer or profile.offload_params:
        suffix = "+offload_optimizer" if profile.offload_optimizer else "+offload_params"
    else:
        suffix = ""
    return Strategy(
        f"zero{stage}{suffix}",
        *shards,
        profile.offload_optimizer,
        profile.offload_params,
        load="layer" if stage == 3 else "process",
    )


@dataclass
class MemoryRow:
    """Estimated bytes on one device."""

    strategy: str
    weights: float
    grads: float
    optimizer: float
    activations: float
    host: float = 0.0  # CPU memory per node (host_bytes), not part of the device total

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations


def parameter_widths(
    strategy: Strategy, precision: str, model_dtype: str | None, peft: str, checkpoint: str
) -> tuple[int, int, int]:
    """Bytes per (trained weight, frozen weight, trained weight's optimizer states): the
    module docstring's rules, with model.dtype resolved as training resolves it
    (trainer/model/dtypes.py; `checkpoint`: the dtype 'auto' stands for)."""
    if strategy.name.startswith("zero") and precision != "no":
        return 2, 2, ADAM_STATE_BYTES + MASTER_COPY_BYTES  # the engine casts the module
    trained, frozen = (
        dtypes.BYTES[checkpoint if name == "auto" else name]
        for name in (
            dtypes.trained_dtype(model_dtype, peft, precision),
            dtypes.base_dtype(model_dtype, peft, precision),
        )
    )
    if peft == "qlora" and not strategy.name.startswith(("fsdp", "zero3")):
        frozen = 4  # peft's k-bit preparation upcasts what is not 4-bit to fp32
    return trained, frozen, 2 * trained  # torch's AdamW: m and v in the parameter's dtype


def state_bytes(
    params: ParamCount,
    strategy: Strategy,
    precision: str,
    model_dtype: str | None = None,
    peft: str = "none",
) -> tuple[float, ...]:
    """(weights, gradients, optimizer states) per device, by the module docstring's rules."""
    trained, frozen, optimizer_width = parameter_widths(
        strategy, precision, model_dtype, peft, params.checkpoint_dtype
    )
    weights = params.trainable * trained + params.frozen_other * frozen
    weights += params.frozen_quantized * QLORA_BYTES
    # offloaded, the gradients go to the host bucket by bucket as they are reduced
    grads = 0.0 if strategy.offload_optimizer else params.trainable * trained / strategy.grad_shards
    optimizer = params.trainable * optimizer_width / strategy.optimizer_shards
    return (
        0.0 if strategy.offload_params else weights / strategy.weight_shards,
        grads,
        0.0 if strategy.offload_optimizer else optimizer,
    )


def host_bytes(
    params: ParamCount, strategy: Strategy, profile: ClusterProfile, precision: str
) -> float:
    """CPU memory per node for the model states (module docstring): the offloaded weights,
    plus the larger of the model while it loads and the offloaded optimizer (loading is
    over before the optimizer is built, and the loaded copy is freed once on the device)."""
    per_node = profile.processes_per_node
    on_device = dataclasses.replace(strategy, offload_optimizer=False, offload_params=False)
    weights = state_bytes(params, on_device, precision)[0] * per_node
    optimizer = params.trainable * OFFLOADED_OPTIMIZER_BYTES / strategy.optimizer_shards
    model = (params.trainable + params.frozen_other) * LOAD_BYTES
    model += params.frozen_quantized * QLORA_BYTES
    loading = {
        "process": model * per_node,
        "node": model,
        "layer": params.largest_layer * LOAD_BYTES * per_node,
    }[strategy.load]
    return (weights if strategy.offload_params else 0.0) + max(
        loading, optimizer * per_node if strategy.offload_optimizer else 0.0
    )


def scores_the_vocabulary(cfg: RunConfig) -> bool:
    """Whether the head gives every position a logit per vocabulary entry (mlm, clm, sft)."""
    return TASKS[cfg.task].auto_class.endswith(("MaskedLM", "CausalLM"))


def activation_bytes(params: ParamCount, cfg: RunConfig, precision: str, recompute: bool) -> float:
    """Activations kept for the backward pass of one micro batch (module docstring)."""
    b, s = cfg.train.micro_batch_size * TASKS[cfg.task].sequences_per_example, cfg.data.max_length
    h, a, layers = params.hidden, params.heads, params.layers
    one_layer = s * b * h * LAYER_BYTES_PER_TOKEN_AND_WIDTH + ATTENTION_BYTES * a * s * s * b
    kept = layers * 2 * s * b * h + one_layer if recompute else layers * one_layer
    if precision == "no":
        kept *= 2
    logits = s * b * params.vocab * 4 if scores_the_vocabulary(cfg) else 0
    return float(kept + logits)


def memory_rows(job: Job, params: ParamCount) -> tuple[list[MemoryRow], str]:
    """The memory table and the name of the chosen row (added when it is not an
    alternative, e.g. ZeRO-2 with optimizer offload)."""
    profile, cfg = job.profile, job.cfg
    recompute = cfg.train.gradient_checkpointing or (
        profile.backend == "fsdp" and profile.fsdp.activation_checkpointing
    )
    activations = activation_bytes(params, cfg, job.precision, recompute)
    chosen = chosen_strategy(profile)
    strategies = alternative_strategies(profile)
    if chosen.name not in [s.name for s in strategies]:
        strategies.append(chosen)
    dtype, peft = cfg.model.dtype, cfg.peft.method
    rows = []
    for s in strategies:
        weights, grads, optimizer = state_bytes(params, s, job.precision, dtype, peft)
        weights += reference_bytes(job, params)
        host = host_bytes(params, s, profile, job.precision)
        rows.append(MemoryRow(s.name, weights, grads, optimizer, activations, host))
    return rows, chosen.name


def reference_bytes(job: Job, params: ParamCount) -> float:
    """A task's frozen copy of the initial model (preference: DPO/IPO in full fine-tuning),
    whole on every device in the dtype the model loads in; 0 when the run holds none."""
    frozen_copy = TASKS[job.cfg.task].frozen_copy
    if frozen_copy is None or not frozen_copy(job.cfg):
        return 0.0
    widths = parameter_widths(
        Strategy("ddp"), job.precision, job.cfg.model.dtype, "none", params.checkpoint_dtype
    )
    return float(params.total * widths[0])


# --- the plan ------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything `trainer plan` prints, as numbers (the tests read these)."""

    job: Job
    accumulation: int
    tokens_per_step: int
    data: DataCount
    steps_per_epoch: int | None
    total_steps: int | None
    params: ParamCount | None
    params_unknown: str
    memory: list[MemoryRow]
    chosen: str
    backend_settings: dict | None


def make_plan(config_path: str, cluster: str, overrides: list[str]) -> Plan:
    """Check the job, count examples and parameters, estimate memory."""
    job = checked_job(config_path, cluster, overrides)
    cfg = job.cfg
    data = count_examples(cfg)
    steps_per_epoch = total = None
    if data.examples is not None:
        steps_per_epoch = data.examples // cfg.train.global_batch_size
        if steps_per_epoch == 0:
            raise UserError(
                f"train.global_batch_size: {cfg.train.global_batch_size} is more than the "
                f"{data.examples} training examples; lower it or add data"
            )
        total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    params, unknown, memory, chosen = None, "", [], chosen_strategy(job.profile).name
    try:
        params = count_parameters(cfg, data)
        memory, chosen = memory_rows(job, params)
    except Exception as err:  # an estimate never stops the plan; the reason is printed
        unknown = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    settings = None
    if job.profile.backend == "deepspeed":
        settings = deepspeed_config(cfg, job.profile, job.precision)
    elif job.profile.backend == "fsdp":
        settings = fsdp_settings(job.profile)
    return Plan(
        job,
        cfg.gradient_accumulation_steps(job.profile.world_size),
        cfg.train.global_batch_size * cfg.data.max_length,
        data,
        steps_per_epoch,
        total,
        params,
        unknown,
        memory,
        chosen,
        settings,
    )


# --- printing ------------------------------------------------------------------------------


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    if count == 0:
        return "0"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _batch_lines(plan: Plan) -> list[str]:
    job, cfg = plan.job, plan.job.cfg
    profile = job.profile
    if TASKS[cfg.task].packed:
        exactness = "exact: packed blocks"
    elif cfg.data.packing:
        exactness = "an upper bound: rows of packed examples hold at most that many tokens"
    else:
        exactness = "an upper bound: examples are padded to the longest in a micro batch"
    if plan.data.examples is None:
        examples = f"unknown ({plan.data.unknown})"
        steps = "unknown (the number of training examples is unknown)"
    else:
        examples = f"{plan.data.examples:,} after encoding"
        source = (
            f"train.max_steps; {plan.steps_per_epoch:,} per epoch"
            if cfg.train.max_steps
            else f"{cfg.train.epochs} epochs x {plan.steps_per_epoch:,} per epoch"
        )
        steps = f"{plan.total_steps:,} ({source})"
    return [
        f"world size          {profile.world_size} ({profile.nodes} node(s) x "
        f"{profile.processes_per_node} processes, {profile.device}, {profile.backend})",
        f"precision           {job.precision}",
        f"micro batch         {cfg.train.micro_batch_size} per process",
        f"accumulation steps  {plan.accumulation}",
        f"global batch        {cfg.train.global_batch_size} (= {cfg.train.micro_batch_size} x "
        f"{plan.accumulation} x {profile.world_size})",
        f"tokens per step     {plan.tokens_per_step:,} (global batch x data.max_length "
        f"{cfg.data.max_length}; {exactness})",
        f"training examples   {examples}",
        f"total steps         {steps}",
    ]


def _backend_lines(plan: Plan) -> list[str]:
    job = plan.job
    settings = accelerate_config(job.cfg, job.profile, job.precision, None)
    lines = [
        f"accelerate: distributed_type {settings['distributed_type']}, num_processes "
        f"{settings['num_processes']}, num_machines {settings['num_machines']}, "
        f"mixed_precision {settings.get('mixed_precision', job.precision)}"
    ]
    if job.profile.backend == "deepspeed":
        where = Path(job.run_dir) / "launch" / "deepspeed.json"
        lines += ["", f"DeepSpeed config ({where}):", json.dumps(plan.backend_settings, indent=2)]
    elif job.profile.backend == "fsdp":
        lines += ["", "FSDP settings (accelerate fsdp_config):"]
        lines.append(json.dumps(plan.backend_settings, indent=2))
        if "parallelism_config" in settings:  # HYBRID_SHARD's 2-D mesh
            lines += ["parallelism_config:", json.dumps(settings["parallelism_config"], indent=2)]
    return lines


def _memory_lines(plan: Plan) -> list[str]:
    if plan.params is None:
        return [f"memory per device   unknown ({plan.params_unknown})"]
    params, cfg = plan.params, plan.job.cfg
    lines = [
        f"parameters          {params.total:,} ({params.model_class}); trainable "
        f"{params.trainable:,} (peft.method {cfg.peft.method})",
        "",
        f"memory per device (estimate; micro batch {cfg.train.micro_batch_size} x "
        f"{cfg.data.max_length} tokens; formulas: launch/plan.py)",
        *_reference_lines(plan),
        f"  {'strategy':<22}{'weights':>12}{'grads':>12}{'optimizer':>12}"
        f"{'activations':>13}{'total':>12}{'host/node':>12}",
    ]
    for row in plan.memory:
        mark = "*" if row.strategy == plan.chosen else " "
        cells = (row.weights, row.grads, row.optimizer)
        lines.append(
            f"{mark} {row.strategy:<22}"
            + "".join(f"{human_bytes(c):>12}" for c in cells)
            + f"{human_bytes(row.activations):>13}{human_bytes(row.total):>12}"
            + f"{human_bytes(row.host):>12}"
        )
    lines += [
        f"* this profile ({plan.chosen}); total: per device; host/node: CPU memory per node for "
        "the loaded and offloaded model states",
        "  (the process itself and pinned buffers come on top; DeepSpeed's own estimator adds "
        "50% for them)",
    ]
    return lines


def _reference_lines(plan: Plan) -> list[str]:
    """Whether the weights include a frozen reference copy, for a task that may hold one."""
    if TASKS[plan.job.cfg.task].frozen_copy is None:
        return []
    held = reference_bytes(plan.job, plan.params)
    if held:
        return [f"  weights include a frozen reference copy of {human_bytes(held)} (not sharded)"]
    return ["  no reference copy (LoRA/QLoRA: the adapter disabled; simpo/orpo: none)"]


def render(plan: Plan) -> str:
    """The text `trainer plan` prints."""
    job = plan.job
    head = f"plan: {job.config_path} on cluster profile {job.profile.name} (task {job.cfg.task})"
    sections = [[head, *_batch_lines(plan)], _backend_lines(plan), _memory_lines(plan)]
    return "\n\n".join("\n".join(section) for section in sections)


def plan(config_path: str, cluster: str, overrides: list[str]) -> str:
    """`trainer plan CONFIG --cluster PROFILE [key=value ...]`: the printed plan."""
    return render(make_plan(config_path, cluster, overrides))
