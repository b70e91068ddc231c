"""SLURM requeue after a preemption: `python -m launch.requeue`.

Training knows nothing of SLURM: on SIGTERM / SIGUSR1 or at train.max_time it saves a
checkpoint and exits with 75 (`EXIT_PREEMPTED`). Whoever started it decides what 75 means:
under a requeue-enabled SLURM job (`TRAINER_SLURM_REQUEUE=1`, set by `trainer submit` and the
slurm/ templates) the batch script, or `trainer launch`, then asks SLURM to requeue the job,
once, and the requeued job resumes from the checkpoint (train.resume=auto). The job id comes
from the environment and is validated here, in one place, because it goes to scontrol.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys

from trainer.logs import console, get_logger

logger = get_logger("launch.requeue")  # not __name__: run as `python -m`, that is "__main__"
REQUEUE_ENV = "TRAINER_SLURM_REQUEUE"  # "1": requeue this SLURM job when training exits 75
_JOB_ID = re.compile(r"\d+(_\d+)?")
RESUME_HINT = "run the same command to resume"
# scontrol asks slurmctld, which answers in well under a second when healthy; a minute
# covers a busy controller without keeping a finished job's allocation for long.
SCONTROL_TIMEOUT_S = 60.0


def slurm_job_to_requeue() -> str | None:
    """The SLURM job id to requeue (array jobs: ARRAY_TASK), or None when not under a
    requeue-enabled SLURM job. Ids are validated: they go to scontrol as an argument."""
    if os.environ.get(REQUEUE_ENV) != "1" or "SLURM_JOB_ID" not in os.environ:
        return None
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{task}" if array_job and task else os.environ["SLURM_JOB_ID"]
    return job_id if _JOB_ID.fullmatch(job_id) else None


def requeue(job_id: str, timeout_s: float | None = None) -> str | None:
    """`scontrol requeue JOB` (an argument list, no shell); None when scontrol accepted it,
    otherwise why not. A missing scontrol (e.g. inside a container) is a refusal, not a
    crash, and so is one that hangs (a slurmctld that does not answer): it is killed after
    `timeout_s` (default SCONTROL_TIMEOUT_S), so that the batch script ends; the checkpoint
    is saved either way."""
    timeout_s = timeout_s or SCONTROL_TIMEOUT_S
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job_id], check=False, capture_output=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return f"scontrol requeue did not answer within {timeout_s:g} s"
    except OSError:
        return "scontrol requeue refused or not found"
    return None if result.returncode == 0 else "scontrol requeue refused or not found"


def requeue_preempted_job(job_id: str) -> bool:
    """Requeue `job_id`, whose training just stopped at a saved checkpoint (exit 75), and
    say on stderr what happened, or what to do when SLURM would not."""
    problem = requeue(job_id)
    if problem is None:
        logger.info("requeued SLURM job %s: it resumes from the saved checkpoint", job_id)
        return True
    logger.warning("could not requeue SLURM job %s (%s); %s", job_id, problem, RESUME_HINT)
    return False


def main(argv: list[str] | None = None) -> int:
    """`python -m launch.requeue`, run by the batch script once training exited with 75:
    0 when the job was requeued, 1 when not (the reason and the hint on stderr)."""
    argparse.ArgumentParser(
        prog="python -m launch.requeue",
        description="Requeue this SLURM job after its training stopped at a saved checkpoint "
        f"(exit 75); needs {REQUEUE_ENV}=1 and SLURM_JOB_ID.",
    ).parse_args(argv)
    job_id = slurm_job_to_requeue()
    with console(logging.INFO):
        if job_id is None:
            logger.warning(
                "not requeued: not a requeue-enabled SLURM job (%s=1 and a numeric "
                "SLURM_JOB_ID); %s",
                REQUEUE_ENV,
                RESUME_HINT,
            )
            return 1
        return 0 if requeue_preempted_job(job_id) else 1


if __name__ == "__main__":
    sys.exit(main())
