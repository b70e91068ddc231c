"""Where training numbers go: RUN_DIR/metrics.jsonl, the trackers, the progress bar.

Only the main process writes. Values arrive already reduced over all processes.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate import Accelerator
from tqdm.auto import tqdm

from trainer import atomic, progress
from trainer.config import RunConfig, to_dict
from trainer.logs import get_logger
from trainer.run.records import finite
from trainer.run.tracker_runs import start_trackers

logger = get_logger(__name__)


def _scalars(values: dict, prefix: str = "") -> dict[str, float]:
    """Flatten nested numbers to `a/b` keys (trackers take scalars only)."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def _hyperparameters(cfg: RunConfig) -> dict:
    flat = {}
    for section, values in to_dict(cfg).items():
        if isinstance(values, dict):
            for key, value in values.items():
                if isinstance(value, (int, float, str, bool)):
                    flat[f"{section}.{key}"] = value
        else:
            flat[section] = values
    return flat


class RunLog:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors it to trackers."""

    def __init__(
        self,
        accelerator: Accelerator,
        run_dir: Path,
        cfg: RunConfig,
        total_steps: int,
        start_step: int = 0,
        elapsed_s: float = 0.0,
        resumed: bool = False,
    ):
        self.accelerator = accelerator
        self.path = run_dir / "metrics.jsonl"
        self.started = time.perf_counter() - elapsed_s  # a resumed run's clock continues
        self.paused_s = 0.0
        self.paused_at: float | None = None
        if cfg.log.trackers:  # `resumed`: continue the tracker runs of the first start
            start_trackers(accelerator, cfg, run_dir, resumed, _hyperparameters(cfg))
        self.progress = tqdm(
            total=total_steps,
            initial=start_step,
            disable=not (accelerator.is_main_process and progress.enabled()),
            dynamic_ncols=True,
            desc="train",
        )

    def elapsed(self) -> float:
        """Seconds spent training so far, over all starts of the run (evaluation and saving
        excluded: the clock stands still while paused, so a checkpoint saves where it is)."""
        now = self.paused_at if self.paused_at is not None else time.perf_counter()
        return now - self.started - self.paused_s

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the enclosed work (evaluation, saving) out of the training clock."""
        self.paused_at = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - self.paused_at
            self.paused_at = None

    def write(self, record: dict) -> None:
        """Log one record (it must hold `step`) to every sink. A full disk stops the run
        (TrainingFailed) with metrics.jsonl as it was before the record."""
        if not self.accelerator.is_main_process:
            return
        line = json.dumps(finite(record), allow_nan=False) + "\n"
        size = self.path.stat().st_size if self.path.exists() else 0
        # On a full disk the torn line goes: the file ends at its last whole record again.
        undo = functools.partial(os.truncate, self.path, size)
        with atomic.stop_on_failed_write(self.path, undo), self.path.open("a") as handle:
            handle.write(line)
        self.accelerator.log(
            _scalars({k: v for k, v in record.items() if k != "step"}), step=record["step"]
        )

    def show(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        """Move the progress bar to `step` with the latest numbers."""
        self.progress.update(step - self.progress.n)
        self.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")

    def note(self, line: str) -> None:
        """One line, from the main process only (the logger's filter drops the others'; the
        CLI's handler writes it above the bar)."""
        logger.info(line)

    def warn(self, line: str) -> None:
        """One warning, as `note`."""
        logger.warning(line)

    def close(self) -> None:
        """Flush the trackers and the progress bar."""
        self.progress.close()
        self.accelerator.end_training()
