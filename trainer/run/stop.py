"""Stopping on request: SIGTERM / SIGUSR1 only set a flag; the loop acts on it at the next
optimizer-step boundary, where every process agrees (one all-reduce), saves, and exits with
`EXIT_PREEMPTED`. Running the same command again resumes. What else 75 means is up to
whoever started the run: under SLURM, launch/ requeues the job (launch/requeue.py).
"""

from __future__ import annotations

import signal
import time

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved; run the same command again


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
