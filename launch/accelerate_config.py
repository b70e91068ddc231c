"""Accelerate config and DeepSpeed JSON, derived from one run config and one profile.

Every number DeepSpeed needs (micro batch, accumulation, global batch, clipping, precision)
is computed from the run config here, never written by hand, so the DeepSpeed JSON can not
contradict the training arguments (the classic `train_batch_size != micro * gas * world`
failure); `trainer plan` prints exactly what `trainer launch` writes.
"""

from __future__ import annotations

from launch.profiles import ClusterProfile
from trainer.config import RunConfig

DISTRIBUTED_TYPES = {
    ("cpu", "ddp"): "MULTI_CPU",
    ("gpu", "ddp"): "MULTI_GPU",
    ("gpu", "deepspeed"): "DEEPSPEED",
    ("cpu", "deepspeed"): "DEEPSPEED",
    ("gpu", "fsdp"): "FSDP",
    ("cpu", "fsdp"): "FSDP",
}


def effective_precision(cfg: RunConfig, profile: ClusterProfile, explicit: bool) -> str:
    """The run's precision unless it was left at its default and the profile names one."""
    return cfg.train.precision if explicit or profile.precision is None else profile.precision


def deepspeed_config(cfg: RunConfig, profile: ClusterProfile, precision: str) -> dict:
    """The DeepSpeed JSON for this run on this profile."""
    micro = cfg.train.micro_batch_size
    zero: dict = {
        "stage": profile.zero_stage,
        "overlap_comm": profile.device == "gpu",
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e7,
    }
    if profile.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if profile.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if profile.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps(profile.world_size),
        "gradient_clipping": cfg.train.max_grad_norm,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "steps_per_print": 10**9,  # our own log does the printing
        "wall_clock_breakdown": False,
    }


def fsdp_settings(profile: ClusterProfile) -> dict:
    """Accelerate's fsdp_config block for this profile, in the keys FSDP2 reads.

    Accelerate's FullyShardedDataParallelPlugin reads `fsdp_sharding_strategy` only under
    FSDP1; FSDP2 takes `fsdp_reshard_after_forward` (FULL_SHARD: true, free the gathered
    weights after each unit's forward; SHARD_GRAD_OP: false, keep them until its backward)
    and hybrid sharding from the parallelism config (`parallelism_settings`). Keys FSDP2
    calls obsolete (sync_module_states, use_orig_params, backward/forward prefetch) are
    left out; `accelerate launch`'s own defaults for them pass its checks.
    """
    return {
        "fsdp_version": 2,
        "fsdp_reshard_after_forward": profile.fsdp.sharding_strategy != "SHARD_GRAD_OP",
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP"
        if profile.fsdp.auto_wrap == "transformer"
        else "NO_WRAP",
        "fsdp_activation_checkpointing": profile.fsdp.activation_checkpointing,
        "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_cpu_ram_efficient_loading": True,
    }


def parallelism_settings(profile: ClusterProfile) -> dict | None:
    """Accelerate's parallelism_config block: HYBRID_SHARD is FSDP2 on a 2-D device mesh,
    the weights replicated across the nodes and sharded over the processes of each node
    (`accelerate launch` turns these keys into PARALLELISM_CONFIG_DP_*_SIZE for the
    processes). None for the other strategies, which shard over the whole world."""
    if profile.backend != "fsdp" or profile.fsdp.sharding_strategy != "HYBRID_SHARD":
        return None
    return {
        "parallelism_config_dp_replicate_size": profile.nodes,
        "parallelism_config_dp_shard_size": profile.processes_per_node,
    }


def accelerate_config(
    cfg: RunConfig, profile: ClusterProfile, precision: str, deepspeed_file: str | None
) -> dict:
    """Accelerate's config file (as for `accelerate launch --config_file`). The machine rank,
    main address and port are given per node on the command line, not here."""
    single = profile.world_size == 1 and profile.backend == "ddp"
    settings: dict = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "NO"
        if single
        else DISTRIBUTED_TYPES[(profile.device, profile.backend)],
        "num_machines": profile.nodes,
        "num_processes": profile.world_size,
        "machine_rank": 0,
        "mixed_precision": precision,
        "use_cpu": profile.device == "cpu",
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "downcast_bf16": "no",
    }
    if profile.backend == "deepspeed":
        del settings["mixed_precision"]  # DeepSpeed's JSON holds it; Accelerate refuses both
        settings["deepspeed_config"] = {
            "deepspeed_config_file": deepspeed_file,
            "zero3_init_flag": profile.zero_stage == 3,
            # one launcher per node, started by srun, rather than accelerate's pdsh fan-out
            "deepspeed_multinode_launcher": "standard",
        }
    if profile.backend == "fsdp":
        settings["fsdp_config"] = fsdp_settings(profile)
        if (parallelism := parallelism_settings(profile)) is not None:
            settings["parallelism_config"] = parallelism
    return settings
