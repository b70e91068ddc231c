"""Cluster profiles: where and how a run config trains (launch/clusters/NAME.yaml, or a file).

A profile never changes what is trained: the same run config keeps its global batch and
learning-rate schedule on every profile, and only the per-process accumulation changes.
Profiles are validated like run configs: every problem at once, each naming its key. The
shipped ones are package data, next to this module, so that `--cluster NAME` works from any
install (a wheel too), not only from a checkout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import PRECISIONS
from trainer.errors import UserError
from trainer.input_checks import installed
from trainer.yaml_sections import build_section, read_yaml

PROFILE_DIR = Path(__file__).resolve().parent / "clusters"
BACKENDS = ("ddp", "deepspeed", "fsdp")
DEVICES = ("cpu", "gpu")
SHARDING = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
AUTO_WRAP = ("transformer", "none")
SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class FsdpOptions:
    sharding_strategy: str = "FULL_SHARD"
    auto_wrap: str = "transformer"  # wrap each transformer block (the model's _no_split_modules)
    activation_checkpointing: bool = False


@dataclass
class SlurmOptions:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "24:00:00"
    constraint: str | None = None
    gres: str | None = None  # e.g. gpu:8
    cpus_per_task: int = 8
    signal_grace_s: int = 300  # SIGUSR1 this long before the time limit, to save and requeue
    extra: list = field(default_factory=list)  # more "#SBATCH ..." lines, e.g. ["--exclusive"]


@dataclass
class ClusterProfile:
    name: str = ""
    device: str = "cpu"
    nodes: int = 1
    processes_per_node: int = 1
    backend: str = "ddp"
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    precision: str | None = None  # default train.precision on this hardware
    fsdp: FsdpOptions = field(default_factory=FsdpOptions)
    env: dict = field(default_factory=dict)
    slurm: SlurmOptions = field(default_factory=SlurmOptions)

    @property
    def world_size(self) -> int:
        """Processes in the whole job."""
        return self.nodes * self.processes_per_node


def _check(profile: ClusterProfile, errors: list[str]) -> None:
    choices = {
        "device": (profile.device, DEVICES),
        "backend": (profile.backend, BACKENDS),
        "fsdp.sharding_strategy": (profile.fsdp.sharding_strategy, SHARDING),
        "fsdp.auto_wrap": (profile.fsdp.auto_wrap, AUTO_WRAP),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            errors.append(f"{key}: '{value}' is not one of {', '.join(allowed)}")
    if profile.precision is not None and profile.precision not in PRECISIONS:
        errors.append(f"precision: '{profile.precision}' is not one of {', '.join(PRECISIONS)}")
    for key in ("nodes", "processes_per_node", "slurm.cpus_per_task"):
        value = profile.slurm.cpus_per_task if key.startswith("slurm") else getattr(profile, key)
        if value < 1:
            errors.append(f"{key}: must be >= 1, got {value}")
    if profile.backend == "deepspeed" and profile.zero_stage not in (1, 2, 3):
        errors.append(f"zero_stage: DeepSpeed needs 1, 2 or 3, got {profile.zero_stage}")
    if profile.backend == "deepspeed" and not installed("deepspeed"):
        errors.append(
            "backend: deepspeed needs the deepspeed package, which is not installed "
            "(pip install deepspeed)"
        )
    if profile.backend != "deepspeed" and profile.zero_stage:
        errors.append(f"zero_stage: only with backend deepspeed (backend is {profile.backend})")
    if (profile.offload_optimizer or profile.offload_params) and profile.backend != "deepspeed":
        errors.append("offload_optimizer: offloading needs backend deepspeed")
    if profile.offload_params and profile.zero_stage != 3:
        errors.append("offload_params: parameter offload needs zero_stage 3")
    if profile.backend == "fsdp":
        _check_fsdp2_sharding(profile, errors)
    if profile.backend == "fsdp" and profile.device == "cpu":
        # Accelerate 1.15 turns FSDP on only for GPU-type processes (AcceleratorState picks
        # FSDP from MULTI_GPU, MULTI_XPU, ...), never from MULTI_CPU: on CPU the run would
        # silently train as gloo DDP while the profile and `trainer plan` say FSDP.
        errors.append(
            "backend: fsdp needs device gpu (Accelerate runs FSDP only on GPUs; on CPU it "
            "would silently train as DDP); use backend ddp, or deepspeed on CPU"
        )


def _check_fsdp2_sharding(profile: ClusterProfile, errors: list[str]) -> None:
    """Strategies FSDP2 can not run. Accelerate's FSDP2 needs a mesh dimension to shard
    over (ParallelismConfig refuses dp_shard_size 1), so NO_SHARD has no FSDP2 form, and
    HYBRID_SHARD with one process per node would shard over nothing: both are DDP."""
    strategy = profile.fsdp.sharding_strategy
    if strategy == "NO_SHARD":
        errors.append(
            "fsdp.sharding_strategy: NO_SHARD has no FSDP2 equivalent (FSDP2 always shards); "
            "use backend: ddp, which is what NO_SHARD does"
        )
    if strategy == "HYBRID_SHARD" and profile.processes_per_node == 1:
        errors.append(
            "fsdp.sharding_strategy: HYBRID_SHARD shards within a node, and "
            "processes_per_node is 1; use backend: ddp, or more processes per node"
        )


def control_character(value: object) -> bool:
    """Whether `value` holds a control character (newline, carriage return, tab, ...). In the
    rendered sbatch script a newline ends the line it is on, even inside quotes or an
    #SBATCH comment: the rest runs as a bash command, and the #SBATCH block ends early,
    silently dropping --requeue and --signal after it."""
    return any(ord(c) < 32 or ord(c) == 127 for c in str(value))


def unsafe_value(key: str, value: object) -> str:
    """The error for a value that can not go into a script line."""
    return f"{key}: {str(value)!r} holds a control character; a script line can not hold it"


def _check_script_values(profile: ClusterProfile, errors: list[str]) -> None:
    """Every profile value `trainer submit` writes into job.sbatch is one line, and every
    env key a shell variable name (`export` of anything else fails, or runs it)."""
    slurm = profile.slurm
    values = {
        "name": profile.name,
        **{f"slurm.{key}": getattr(slurm, key) for key in ("partition", "account", "qos")},
        **{f"slurm.{key}": getattr(slurm, key) for key in ("time", "constraint", "gres")},
        **{f"slurm.extra[{index}]": line for index, line in enumerate(slurm.extra)},
    }
    for key, value in profile.env.items():
        if SHELL_NAME.fullmatch(str(key)):
            values[f"env.{key}"] = value
        else:
            errors.append(
                f"env: {str(key)!r} is not a shell variable name (letters, digits and _, "
                "not starting with a digit)"
            )
    errors += [unsafe_value(k, v) for k, v in values.items() if v and control_character(v)]


def load_profile(name_or_path: str) -> ClusterProfile:
    """A profile by name (a shipped one, launch/clusters/NAME.yaml) or path, validated."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
        raise UserError(f"--cluster: no profile '{name_or_path}' (known: {known})")
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    errors: list[str] = []
    profile = build_section(ClusterProfile, raw, "", errors)
    _check(profile, errors)
    _check_script_values(profile, errors)
    if errors:
        raise UserError(f"cluster profile {path.name}: " + "; ".join(errors))
    return profile
