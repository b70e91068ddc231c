"""A job: one run config on one cluster profile, checked together before anything starts.

The run config is validated with the profile's world size, so a global batch that the
profile's processes cannot divide is rejected here, on the login node, not after the
allocation. The files a launch needs are written into the run directory.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from launch.accelerate_config import accelerate_config, deepspeed_config, effective_precision
from launch.profiles import ClusterProfile, load_profile
from launch.user_files import check_deepspeed, deepspeed_values, merge_accelerate, read_user_file
from trainer.config import RunConfig, build_config
from trainer.errors import UserError
from trainer.tasks.registry import TASKS
from trainer.yaml_sections import apply_overrides, build_section, read_yaml


@dataclass
class Job:
    """A run config (path, overrides, parsed) on a profile, with the precision resolved."""

    config_path: Path
    overrides: list[str]
    cfg: RunConfig
    profile: ClusterProfile
    precision: str
    user_accelerate: Path | None = None  # --accelerate-config: the user's file, checked
    user_deepspeed: Path | None = None  # --deepspeed: the user's JSON, checked

    @property
    def run_dir(self) -> Path:
        """The run's output_dir, absolute (every node must find the same one)."""
        return Path(self.cfg.output_dir).expanduser().resolve()

    def train_arguments(self) -> list[str]:
        """`trainer train` arguments that reproduce this run config on every node."""
        return ["train", str(self.config_path.resolve()), *self.overrides]

    def prepare_arguments(self) -> list[str]:
        """`trainer prepare` arguments: tokenize this run's data into its cache."""
        return ["prepare", str(self.config_path.resolve()), *self.overrides]


def resolve_job(config_path: str, cluster: str, overrides: list[str]) -> Job:
    """Load and check the profile and the run config together."""
    profile = load_profile(cluster)
    path = Path(config_path)
    raw = apply_overrides(read_yaml(path), overrides)
    explicit = any(item.startswith("train.precision=") for item in overrides)
    cfg = build_config(raw, world_size=profile.world_size)
    precision = effective_precision(cfg, profile, explicit)
    if precision != cfg.train.precision:
        overrides = [*overrides, f"train.precision={precision}"]
        cfg.train.precision = precision
    return Job(path, list(overrides), cfg, profile, precision)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _deepspeed_settings(job: Job) -> dict:
    """Ours, or the user's JSON with "auto" filled in (refused where it contradicts us)."""
    if job.user_deepspeed is None:
        return deepspeed_config(job.cfg, job.profile, job.precision)
    values = deepspeed_values(job.cfg, job.profile.world_size, job.precision)
    theirs = read_user_file(job.user_deepspeed, "--deepspeed")
    settings, errors = check_deepspeed(
        theirs, f"--deepspeed {job.user_deepspeed}", values, job.profile.zero_stage
    )
    if errors:
        raise UserError("; ".join(errors))
    return settings


def _inline_deepspeed_values(job: Job) -> dict[str, tuple]:
    """The deepspeed_config keys an Accelerate config may repeat: (value, origin)."""
    profile = job.profile
    return {
        "deepspeed_config.gradient_accumulation_steps": (
            job.cfg.gradient_accumulation_steps(profile.world_size),
            "train.global_batch_size / (train.micro_batch_size x processes)",
        ),
        "deepspeed_config.gradient_clipping": (job.cfg.train.max_grad_norm, "train.max_grad_norm"),
        "deepspeed_config.zero_stage": (profile.zero_stage, "the profile's zero_stage"),
        "deepspeed_config.offload_optimizer_device": (
            "cpu" if profile.offload_optimizer else "none",
            "the profile's offload_optimizer",
        ),
        "deepspeed_config.offload_param_device": (
            "cpu" if profile.offload_params else "none",
            "the profile's offload_params",
        ),
    }


def _accelerate_settings(job: Job, deepspeed_file: Path | None) -> dict:
    """Ours, or the user's Accelerate config laid over ours (refused where it contradicts
    the run config or the profile)."""
    ours = accelerate_config(
        job.cfg, job.profile, job.precision, str(deepspeed_file) if deepspeed_file else None
    )
    if job.user_accelerate is None:
        return ours
    values = {
        key: (ours[key], "the profile")
        for key in ("distributed_type", "num_processes", "num_machines", "use_cpu")
    }
    values["mixed_precision"] = (job.precision, "train.precision")
    values["dynamo_config.dynamo_backend"] = (
        "INDUCTOR" if job.cfg.train.compile else "NO",
        "train.compile",
    )
    if deepspeed_file is not None:
        values.update(_inline_deepspeed_values(job))
    theirs = read_user_file(job.user_accelerate, "--accelerate-config")
    return merge_accelerate(ours, theirs, f"--accelerate-config {job.user_accelerate}", values)


def write_launch_files(job: Job) -> tuple[Path, Path | None]:
    """accelerate_config.yaml (and deepspeed.json) in RUN_DIR/launch/; returns their paths.
    Both are computed (and a user's file checked) before either is written."""
    folder = job.run_dir / "launch"
    deepspeed_file = folder / "deepspeed.json" if job.profile.backend == "deepspeed" else None
    deepspeed = _deepspeed_settings(job) if deepspeed_file else None
    settings = _accelerate_settings(job, deepspeed_file)
    folder.mkdir(parents=True, exist_ok=True)
    if deepspeed_file is not None:
        _write(deepspeed_file, json.dumps(deepspeed, indent=2))
    config_file = folder / "accelerate_config.yaml"
    _write(config_file, yaml.safe_dump(settings, sort_keys=False))
    return config_file, deepspeed_file


def accelerate_command(
    job: Job, config_file: Path, machine_rank: str, main_address: str, main_port: str
) -> list[str]:
    """`accelerate launch` for one node. machine_rank / address / port may be shell
    variables (`$SLURM_NODEID`) that the node expands, never the submitting shell."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--num_machines",
        str(job.profile.nodes),
        "--num_processes",
        str(job.profile.world_size),
        "--machine_rank",
        machine_rank,
        "--main_process_ip",
        main_address,
        "--main_process_port",
        main_port,
        "-m",
        "trainer",
    ]
    return command + job.train_arguments()


def check_cli_overrides(overrides: list[str]) -> None:
    """Overrides must look like key=value (options go before CONFIG)."""
    for item in overrides:
        if "=" not in item or item.startswith("-"):
            raise UserError(f"override '{item}': expected key=value, e.g. train.lr=3e-5")


def combination_errors(cfg: RunConfig, profile: ClusterProfile, precision: str) -> list[str]:
    """Run config x profile pairs that would fail after the allocation, each naming its key.
    (Offload without DeepSpeed is rejected by the profile itself, a global batch the
    processes can not divide by the run config check.)"""
    errors = []
    if precision == "fp16" and profile.device == "cpu":
        errors.append(
            f"train.precision: fp16 needs CUDA, profile {profile.name} runs on cpu (DeepSpeed's "
            "CPU accelerator guarantees bf16 only); use bf16 or no"
        )
    if cfg.train.gradient_checkpointing and (
        profile.backend == "fsdp" and profile.fsdp.activation_checkpointing
    ):
        errors.append(
            "train.gradient_checkpointing: profile "
            f"{profile.name} already sets fsdp.activation_checkpointing; checkpointing twice "
            "recomputes every layer twice, turn one off"
        )
    spec = TASKS.get(cfg.task)  # a task whose run can't have its weights sharded
    shards = profile.backend == "fsdp" or (profile.backend, profile.zero_stage) == ("deepspeed", 3)
    error = spec.sharding_error(cfg) if shards and spec and spec.sharding_error else None
    if error is not None:
        errors.append(f"{error} (profile {profile.name} shards the weights)")
    return errors


def _errors_beside(config_path: str, cluster: str, overrides: list[str]) -> list[str]:
    """The combination errors of a run config that failed its own checks (best effort),
    so that one message lists everything."""
    try:
        profile = load_profile(cluster)
        cfg = build_section(RunConfig, apply_overrides(read_yaml(config_path), overrides), "", [])
    except UserError:
        return []
    explicit = any(item.startswith("train.precision=") for item in overrides)
    return combination_errors(cfg, profile, effective_precision(cfg, profile, explicit))


def checked_job(
    config_path: str,
    cluster: str,
    overrides: list[str],
    accelerate_file: str | None = None,
    deepspeed_file: str | None = None,
) -> Job:
    """The job, with every run config, profile and combination problem in one UserError;
    the user's launch files (if any) are checked when they are written."""
    check_cli_overrides(overrides)
    try:
        job = resolve_job(config_path, cluster, overrides)
    except UserError as err:
        raise UserError(
            "; ".join([str(err), *_errors_beside(config_path, cluster, overrides)])
        ) from None
    errors = combination_errors(job.cfg, job.profile, job.precision)
    if errors:
        raise UserError("; ".join(errors))
    job.user_accelerate = Path(accelerate_file) if accelerate_file else None
    if accelerate_file and not deepspeed_file:  # the JSON their Accelerate config names
        theirs = read_user_file(accelerate_file, "--accelerate-config")
        deepspeed_file = (theirs.get("deepspeed_config") or {}).get("deepspeed_config_file")
    job.user_deepspeed = Path(deepspeed_file) if deepspeed_file else None
    if deepspeed_file and job.profile.backend != "deepspeed":
        raise UserError(
            f"--deepspeed: profile {job.profile.name} runs backend {job.profile.backend}; "
            "a DeepSpeed JSON needs a deepspeed profile"
        )
    return job
