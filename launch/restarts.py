"""A requeued SLURM job's starts: `trainer train` calls `checked_start` before set-up.

The batch script of `trainer submit` (and the slurm/ templates) holds the command line of
the first start, so a `train.resume=PATH` there would send every requeued start back to
that same checkpoint: hours of training done again at each requeue, forever. A pinned
path is therefore taken only on the job's first start (SLURM_RESTART_COUNT unset or 0);
a requeued start continues from the run's newest checkpoint (`auto`) as soon as the run
has one.

A job that keeps failing before it saves anything new (a node that dies in set-up, a
crash right after resume) is requeued by SLURM again and again. Each start records the
step it starts from in RUN_DIR/logs/starts-JOB.json; the start after
`MAX_STARTS_ENV` (default 3) starts in a row at one step is refused with one line.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

from trainer import atomic
from trainer.config import RunConfig
from trainer.errors import UserError
from trainer.run.resume import COMMIT_NAME, step_folders

MAX_STARTS_ENV = "TRAINER_MAX_STARTS_AT_ONE_STEP"
DEFAULT_MAX_STARTS = 3


def restart_count(environ: Mapping[str, str]) -> int | None:
    """How often SLURM restarted this job (0 on its first start); None outside SLURM."""
    if "SLURM_JOB_ID" not in environ:
        return None
    try:
        return max(int(environ.get("SLURM_RESTART_COUNT", "0") or 0), 0)
    except ValueError:
        return 0


def newest_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint in the run (0: none)."""
    complete = [step for step, folder in step_folders(run_dir) if (folder / COMMIT_NAME).is_file()]
    return complete[0] if complete else 0


def checked_start(cfg: RunConfig, environ: Mapping[str, str]) -> RunConfig:
    """The run config this start trains with: on a requeued start, `train.resume=auto`
    in place of a pinned path once the run has a checkpoint of its own; refuses the start
    when the job has started too often without progress (see the module docstring)."""
    restarts = restart_count(environ)
    if restarts is None:
        return cfg
    run_dir = Path(cfg.output_dir).expanduser().resolve()
    step = newest_step(run_dir)
    _record_start(run_dir, environ, restarts, step)
    if restarts and step and cfg.train.resume not in ("auto", "never"):
        return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume="auto"))
    return cfg


def _record_start(run_dir: Path, environ: Mapping[str, str], restarts: int, step: int) -> None:
    """Add this start to the job's record (by process 0; the others only read it) and
    refuse it when the starts before it, in a row, began at the same step."""
    path = run_dir / "logs" / f"starts-{environ['SLURM_JOB_ID']}.json"
    try:
        starts = {int(k): v for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError, AttributeError):
        starts = {}
    same = 1
    while starts.get(restarts - same) == step:
        same += 1
    if int(environ.get("RANK", "0")) == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(path, {str(k): v for k, v in sorted({**starts, restarts: step}.items())})
    limit = _limit(environ)
    if same > limit:
        raise UserError(
            f"SLURM job {environ['SLURM_JOB_ID']} restarted {same - 1} times from step {step} "
            f"without saving a checkpoint since; not starting again (see {run_dir / 'logs'} "
            f"for why the earlier starts ended; {MAX_STARTS_ENV} raises the limit of {limit}, "
            f"or delete {path})"
        )


def _limit(environ: Mapping[str, str]) -> int:
    """Starts in a row at one step allowed (MAX_STARTS_ENV, a positive integer)."""
    value = environ.get(MAX_STARTS_ENV) or str(DEFAULT_MAX_STARTS)
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"{MAX_STARTS_ENV}={value!r}: expected a positive integer")
    return int(value)
