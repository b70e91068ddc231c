"""Messages for the person running a command (notes, warnings): logging, never print.

Every module logs through `get_logger(__name__)`, so the messages form the hierarchy
`trainer.…` / `launch.…` that a Python caller silences or redirects with standard logging
configuration (`logging.getLogger("trainer").setLevel(logging.ERROR)`). The library adds no
handler at import: the `trainer` command installs one for its duration (`console`) that
writes to stderr, above any progress bar, in the format the command always printed
(`warning: ...`; notes as they are). Results are output, not messages: the CLI prints them
on stdout, its last line one JSON object.

Under torchrun every process runs the same code and would say everything once per process:
the loggers keep only the main process's records, its errors, and the warnings marked
`PER_RANK` (what only that process saw).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

PACKAGES = ("trainer", "launch")  # the roots of our logger hierarchy
LEVEL_ENV = "TRAINER_LOG_LEVEL"  # the level the CLI passes to the processes it starts
PER_RANK = {"per_rank": True}  # `extra=PER_RANK`: a warning every process gives, each its own


def rank() -> int:
    """This process's rank: torchrun and `accelerate launch` set RANK before Python starts,
    so it is known before Accelerate is up (a single process has none: rank 0)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this is the process that speaks for the job (rank 0, or the only one)."""
    return rank() == 0


class _MainProcessOnly(logging.Filter):
    """Drops records other ranks make, unless they are errors or marked PER_RANK. On the
    logger rather than on a handler: it holds whatever handlers a caller configures."""

    def filter(self, record: logging.LogRecord) -> bool:
        keep_anyway = record.levelno >= logging.ERROR or getattr(record, "per_rank", False)
        return keep_anyway or is_main_process()


_MAIN_PROCESS_ONLY = _MainProcessOnly()


def get_logger(name: str) -> logging.Logger:
    """The standard logger `name` (a module's `__name__`), speaking for the main process."""
    logger = logging.getLogger(name)
    if _MAIN_PROCESS_ONLY not in logger.filters:
        logger.addFilter(_MAIN_PROCESS_ONLY)
    return logger


class ConsoleFormatter(logging.Formatter):
    """The lines the commands printed before they logged: notes as they are, `warning: `
    and `error: ` prefixes, debug lines with the module that wrote them; another rank's
    line says which rank."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not is_main_process():
            message = f"[rank {rank()}] {message}"
        if record.levelno >= logging.ERROR:
            message = f"error: {message}"
        elif record.levelno >= logging.WARNING:
            message = f"warning: {message}"
        elif record.levelno < logging.INFO:
            message = f"debug: {record.name}: {message}"
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return message


class ConsoleHandler(logging.Handler):
    """Writes each line through `tqdm.write` to the sys.stderr of the moment (tests and
    callers swap it): tqdm clears the open progress bars, writes the line and draws them
    again below it, so that a warning never lands in the middle of a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def level_from(quiet: bool, verbose: bool) -> int:
    """--quiet: warnings and errors only; --verbose: debug lines too; neither: the level a
    parent `trainer` command passed down (LEVEL_ENV), or notes and warnings."""
    if quiet:
        return logging.WARNING
    if verbose:
        return logging.DEBUG
    inherited = logging.getLevelName(os.environ.get(LEVEL_ENV, "INFO").upper())
    return inherited if isinstance(inherited, int) else logging.INFO


@contextmanager
def console(level: int) -> Iterator[None]:
    """Our messages at `level` and above on stderr while a command runs, and exported to
    the processes it starts (`trainer launch`); afterwards the loggers and the environment
    are as they were (the tests run many commands in one process)."""
    handler = ConsoleHandler()
    handler.setFormatter(ConsoleFormatter())
    loggers = [logging.getLogger(name) for name in PACKAGES]
    levels = [logger.level for logger in loggers]
    inherited = os.environ.get(LEVEL_ENV)
    os.environ[LEVEL_ENV] = logging.getLevelName(level)
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, previous in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(previous)
        if inherited is None:
            os.environ.pop(LEVEL_ENV, None)
        else:
            os.environ[LEVEL_ENV] = inherited
