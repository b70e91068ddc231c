"""Stopping on request: SIGTERM / SIGUSR1 only set a flag; the loop acts on it at the next
optimizer-step boundary, where every process agrees (one all-reduce), saves, and exits with
`EXIT_PREEMPTED`. Under SLURM the job then asks to be requeued, and the next start resumes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved; run the same command again
REQUEUE_ENV = "TRAINER_SLURM_REQUEUE"  # set by `trainer submit` and the slurm/ templates
_JOB_ID = re.compile(r"\d+(_\d+)?")


class Preempted(Exception):
    """Training stopped early on purpose (signal or time limit) after saving a checkpoint."""


class StopFlag:
    """Set by SIGTERM / SIGUSR1 or when `max_seconds` of wall time are about to run out."""

    def __init__(self, max_seconds: float | None, margin_s: float = 0.0) -> None:
        self.reason: str | None = None
        self.deadline = time.monotonic() + max_seconds - margin_s if max_seconds else None

    def install(self) -> None:
        """Catch the signals clusters send before they kill a job."""
        for number in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(number, self._on_signal)

    def _on_signal(self, number: int, _frame) -> None:
        self.reason = signal.Signals(number).name

    def requested(self) -> bool:
        """True once a signal arrived or the time budget is spent (checked once a step)."""
        if self.reason is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = "train.max_time"
        return self.reason is not None


def slurm_job_to_requeue() -> str | None:
    """The SLURM job id to requeue (array jobs: ARRAY_TASK), or None when not under a
    requeue-enabled SLURM job. Ids are validated: they go to scontrol as an argument."""
    if os.environ.get(REQUEUE_ENV) != "1" or "SLURM_JOB_ID" not in os.environ:
        return None
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{task}" if array_job and task else os.environ["SLURM_JOB_ID"]
    return job_id if _JOB_ID.fullmatch(job_id) else None


def requeue(job_id: str) -> bool:
    """`scontrol requeue JOB` (an argument list, no shell); True when scontrol accepted it.
    A missing scontrol (e.g. inside a container) is a refusal, not a crash: the checkpoint
    is saved either way."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], check=False, capture_output=True)
    except OSError:
        return False
    return result.returncode == 0
