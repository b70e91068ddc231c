"""Stopping on request: SIGTERM / SIGUSR1 / SIGINT only set a flag; the loop acts on it at
the next optimizer-step boundary, where every process agrees (one all-reduce), saves, and
exits with `EXIT_PREEMPTED`. Running the same command again resumes. What else 75 means is
up to whoever started the run: under SLURM, launch/ requeues the job (launch/requeue.py).

`trainer train` installs the handlers first thing (`StopFlag.install`), before the config,
the data, the model and the checkpoint load: a signal during set-up is kept, not lost or
fatal, and the run stops before its first step without a new checkpoint. Installing
replaces whatever disposition the process inherited: the SLURM scripts start each node's
launcher with `trap "" USR1`, so the training processes start with SIGUSR1 ignored.
A second SIGINT (Ctrl-C twice) aborts at once, without saving.
"""

from __future__ import annotations

import signal
import time

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved; run the same command again
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C: nothing was saved
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """Training stopped early on purpose (signal or time limit) after saving a checkpoint."""


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT or when `max_seconds` of wall time are about to
    run out."""

    def __init__(self, max_seconds: float | None = None, margin_s: float = 0.0) -> None:
        self.reason: str | None = None
        self.deadline: float | None = None
        self.interrupts = 0  # SIGINTs so far
        self._previous: dict[int, object] = {}  # the handlers before the first install
        self.limit_time(max_seconds, margin_s)

    def limit_time(self, max_seconds: float | None, margin_s: float = 0.0) -> None:
        """Stop `max_seconds` from now (None: no limit)."""
        self.deadline = time.monotonic() + max_seconds - margin_s if max_seconds else None

    def install(self) -> StopFlag:
        """Catch the signals clusters (and Ctrl-C) send before they kill a job, whatever
        this process inherited for them (SIG_IGN under the SLURM scripts)."""
        for number in STOP_SIGNALS:
            previous = signal.signal(number, self._on_signal)
            self._previous.setdefault(number, previous)
        return self

    def restore(self) -> None:
        """Put back the handlers `install` replaced (the run is over; in tests, the next
        run in the same process installs its own flag)."""
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def _on_signal(self, number: int, _frame) -> None:
        if number == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                # Ctrl-C twice: the user does not want to wait for the save. KeyboardInterrupt
                # is Python's own way out (finally blocks run, the run-directory lock is freed).
                raise KeyboardInterrupt
        self.reason = self.reason or signal.Signals(number).name

    def requested(self) -> bool:
        """True once a signal arrived or the time budget is spent (checked once a step)."""
        if self.reason is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = "train.max_time"
        return self.reason is not None
