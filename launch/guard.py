"""What `trainer train` checks of the way it was started, before anything heavy loads.

The training code knows nothing of SLURM or of Accelerate's launcher; these checks read
their environment, so they live with the launch code and `trainer train` calls
`check_train_environment` first (torch-free: a refusal costs no import time):

- `srun -n 8 python -m trainer train` without a launcher starts eight independent runs into
  one output_dir (each its own rank 0, WORLD_SIZE unset);
- `accelerate launch --config_file theirs.yaml` passes that file's precision, dynamo
  backend, accumulation, clipping and DeepSpeed JSON to the processes in ACCELERATE_* env
  vars: each must agree with the run config (launch/user_files.py).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from launch.user_files import check_deepspeed, deepspeed_values, read_user_file, same
from trainer.config import RunConfig
from trainer.errors import UserError
from trainer.input_checks import installed


def slurm_tasks(environ: Mapping[str, str]) -> int:
    """Tasks of the SLURM step this process is one of (1 outside srun). SLURM_STEP_NUM_TASKS
    is set by srun; SLURM_NTASKS alone is also set in the batch script itself, which is one
    process whatever --ntasks says, so it counts only inside a step (SLURM_STEP_ID)."""
    value = environ.get("SLURM_STEP_NUM_TASKS")
    if value is None and "SLURM_STEP_ID" in environ:
        value = environ.get("SLURM_NTASKS")
    try:
        return int(value) if value is not None else 1
    except ValueError:
        return 1


def check_process_layout(environ: Mapping[str, str]) -> None:
    """Refuse several SLURM tasks that were not started as one job by a launcher."""
    tasks = slurm_tasks(environ)
    if tasks > 1 and "WORLD_SIZE" not in environ:
        raise UserError(
            f"SLURM started {tasks} tasks of `trainer train` without a launcher (WORLD_SIZE is "
            "unset): each would train alone into the same output_dir; use `trainer submit`, "
            "or srun one task per node that runs torchrun / accelerate launch"
        )


def accelerate_env_errors(cfg: RunConfig, environ: Mapping[str, str]) -> list[str]:
    """ACCELERATE_* settings (from an `accelerate launch` config) that contradict the run
    config, one line each naming both values."""
    world = int(environ.get("WORLD_SIZE", "1"))
    deepspeed = environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    precision = cfg.train.precision
    expected = {
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": (
            cfg.gradient_accumulation_steps(world),
            f"train.global_batch_size / (train.micro_batch_size x {world} processes)",
        ),
        "ACCELERATE_GRADIENT_CLIPPING": (cfg.train.max_grad_norm, "train.max_grad_norm"),
        "ACCELERATE_MIXED_PRECISION": (precision, "train.precision"),
        "ACCELERATE_DYNAMO_BACKEND": ("INDUCTOR" if cfg.train.compile else "NO", "train.compile"),
    }
    if deepspeed and environ.get("ACCELERATE_MIXED_PRECISION") == "no":
        del expected["ACCELERATE_MIXED_PRECISION"]  # DeepSpeed's JSON holds the precision
    errors = [
        f"{name}={environ[name]} (from the accelerate launch config) but the run config "
        f"gives {want} ({origin})"
        for name, (want, origin) in expected.items()
        if environ.get(name, "auto") != "auto" and not same(environ[name], want)
    ]
    if deepspeed and not installed("deepspeed"):
        errors.append(
            "ACCELERATE_USE_DEEPSPEED=true (a deepspeed profile or accelerate config) but the "
            "deepspeed package is not installed (pip install deepspeed)"
        )
    json_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if deepspeed and json_file != "none":
        settings = read_user_file(json_file, "ACCELERATE_DEEPSPEED_CONFIG_FILE")
        values = deepspeed_values(cfg, world, precision)
        errors += check_deepspeed(settings, f"DeepSpeed JSON {json_file}", values)[1]
    return errors


def check_train_environment(cfg: RunConfig, environ: Mapping[str, str] | None = None) -> None:
    """Everything above, as one UserError (exit 2, one line)."""
    environ = os.environ if environ is None else environ
    check_process_layout(environ)
    errors = accelerate_env_errors(cfg, environ)
    if errors:
        raise UserError("; ".join(errors))
