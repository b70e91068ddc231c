"""Progress bars on the long steps: tokenizing, training, evaluating, predicting.

A bar is drawn by the main process only, and only where someone watches: when stderr is a
terminal. `TRAINER_PROGRESS=0` (what the CLI's `--no-progress` sets) turns every bar off,
`TRAINER_PROGRESS=1` forces them on without a terminal: `trainer launch` passes its own
decision this way to the processes it starts, whose stderr is a pipe to it. Our bars replace
those of `datasets` (the CLI hides them); the hub's download bars are the hub's to show
(HF_HUB_DISABLE_PROGRESS_BARS), except that --no-progress hides them too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TextIO

from tqdm.auto import tqdm

from trainer.logs import is_main_process

PROGRESS_ENV = "TRAINER_PROGRESS"


def enabled(stream: TextIO | None = None) -> bool:
    """Whether bars are drawn here: main process; then TRAINER_PROGRESS when set (0 or 1);
    otherwise whether `stream` (stderr) is a terminal."""
    if not is_main_process():
        return False
    forced = os.environ.get(PROGRESS_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def bar(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    leave: bool = True,
    initial: int = 0,
) -> tqdm:
    """A tqdm bar on stderr that draws itself only when `enabled()` (disabled, it costs
    nothing and `update` does nothing)."""
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=leave,
        initial=initial,
        disable=not enabled(),
        dynamic_ncols=True,
    )


_counting: ContextVar[tqdm | None] = ContextVar("trainer_progress_counting", default=None)


@contextmanager
def counting(total: int, desc: str, unit: str = "rows") -> Iterator[tqdm]:
    """A bar that code further down moves with `advance(n)` without being handed it: the
    tokenizer calls inside the task encoders (data/encode.py), whose signature every task
    spec shares. Outside this block `advance` does nothing (a stream encoding mid-run)."""
    with bar(desc=desc, total=total, unit=unit) as shown:
        token = _counting.set(shown)
        try:
            yield shown
        finally:
            _counting.reset(token)


def advance(count: int) -> None:
    """Move the bar of the enclosing `counting` block, if any, by `count`."""
    shown = _counting.get()
    if shown is not None:
        shown.update(count)


def child_environment() -> dict[str, str]:
    """What a process started with its stderr piped to this one (`trainer launch`) needs to
    draw bars exactly when this one would: it would see a pipe, never a terminal."""
    return {PROGRESS_ENV: "1" if enabled() else "0"}
