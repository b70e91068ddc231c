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
from dataclasses import dataclass

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved; run the same command again
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C: nothing was saved
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """Training stopped early on purpose (signal or time limit) after saving a checkpoint."""


# What is kept free before train.max_time besides the measured step, evaluation and save:
# their variation and the exit. 5% of the limit, at most 30 s (so also for limits of seconds).
SLACK_SHARE, SLACK_MAX_S = 0.05, 30.0


@dataclass
class TimeBudget:
    """`train.max_time`, counted from process start (`trainer train` creates its StopFlag
    first thing), so that the set-up counts as the scheduler counts it.

    The stop is decided before a step, and a step, maybe an evaluation, and a checkpoint
    save follow it before the process exits: the budget is spent once what is left is less
    than the longest step measured (the first of this process, with its warm-up, not
    counted), the longest evaluation when one is due after that step, the longest save
    (before this process saved, the one the resumed run measured, or the time its
    checkpoint took to load), and a slack of 5% of the limit, at most 30 s."""

    started: float  # time.monotonic() at process start
    seconds: float | None = None  # None: no limit
    step_s: float = 0.0
    eval_s: float = 0.0
    save_s: float = 0.0
    steps: int = 0  # measured so far

    def note_step(self, seconds: float) -> None:
        """One optimizer step took `seconds`."""
        if self.steps:
            self.step_s = max(self.step_s, seconds)
        self.steps += 1

    def margin_s(self, evaluating: bool = False) -> float:
        """Seconds kept free before the limit (see the class)."""
        slack = min(SLACK_MAX_S, SLACK_SHARE * (self.seconds or 0.0))
        return slack + self.step_s + self.save_s + (self.eval_s if evaluating else 0.0)

    def used_s(self) -> float:
        """Seconds since process start."""
        return time.monotonic() - self.started

    def spent(self, evaluating: bool = False) -> bool:
        """True when the next step, and what follows it, might not fit any more."""
        if self.seconds is None:
            return False
        return self.used_s() + self.margin_s(evaluating) > self.seconds


class StopFlag:
    """Set by SIGTERM / SIGUSR1 / SIGINT or when the `train.max_time` budget is spent."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.budget = TimeBudget(time.monotonic())  # the clock starts now
        self.interrupts = 0  # SIGINTs so far
        self._previous: dict[int, object] = {}  # the handlers before the first install

    def limit_time(self, max_seconds: float | None) -> None:
        """Stop before `max_seconds` since this flag was created (None: no limit)."""
        self.budget.seconds = max_seconds

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

    def requested(self, evaluating: bool = False) -> bool:
        """True once a signal arrived or the time budget is spent (checked once a step;
        `evaluating`: an evaluation is due after the coming step)."""
        if self.reason is None and self.budget.spent(evaluating):
            self.reason = "train.max_time"
        return self.reason is not None
