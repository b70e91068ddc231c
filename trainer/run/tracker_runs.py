"""The tracker runs a run directory logs to, the same ones across restarts.

One training run is one tracker run however often it is stopped and resumed: the first
start writes each tracker's run id to RUN_DIR/trackers.json (atomically), and a start that
resumes a checkpoint hands the ids back to accelerate's trackers (MLflowTracker's `run_id`,
`wandb.init`'s `id` with `resume="allow"`), so that MLflow shows one run and W&B one run
holding every step. A start from step 0 (no checkpoint yet) opens new tracker runs, as it
writes metrics.jsonl anew. Only the main process starts trackers (accelerate's
`init_trackers` and `log` run there alone).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker

from trainer import atomic
from trainer.config import RunConfig
from trainer.trackers import MLFLOW_TRACKING_URI

TRACKER_RUNS = "trackers.json"

# A started tracker's run id, read from what accelerate's tracker wraps (the MLflow
# ActiveRun, the wandb Run), and the init arguments that continue that run.
_RUN_ID: dict[str, Callable[[Any], str]] = {
    "mlflow": lambda active_run: active_run.info.run_id,
    "wandb": lambda run: run.id,
}
_CONTINUE: dict[str, Callable[[str], dict]] = {
    "mlflow": lambda run_id: {"run_id": run_id},
    "wandb": lambda run_id: {"id": run_id, "resume": "allow"},
}


def log_with(cfg: RunConfig, run_dir: Path) -> list | None:
    """Accelerator's `log_with`: TensorBoard as a tracker of our making, so that its events
    stay in RUN_DIR/tensorboard (by name, accelerate puts them in a folder named after the
    project); the others by name, started by `start_trackers`."""
    trackers: list = []
    for name in cfg.log.trackers:
        if name == "tensorboard":
            options = cfg.log.tracker_options.get(name, {})
            trackers.append(TensorBoardTracker("tensorboard", str(run_dir), **options))
        else:
            trackers.append(name)
    return trackers or None


def _defaults(name: str, run_dir: Path) -> dict:
    """Init arguments the user's tracker_options may override: the tracker run named after
    the run directory; W&B's files inside it unless WANDB_DIR says where (else ./wandb)."""
    if name == "mlflow":
        return {"run_name": run_dir.name}
    if name == "wandb":
        return {"name": run_dir.name} | ({} if "WANDB_DIR" in os.environ else {"dir": str(run_dir)})
    return {}


def _saved_runs(run_dir: Path) -> dict[str, str]:
    """Tracker name -> the id of its run, as the run's first start wrote them."""
    path = run_dir / TRACKER_RUNS
    return json.loads(path.read_text()) if path.is_file() else {}


def start_trackers(
    accelerator: Accelerator, cfg: RunConfig, run_dir: Path, resumed: bool, hyperparameters: dict
) -> None:
    """Start every tracker of log.trackers, continuing the saved tracker runs when `resumed`,
    and log `hyperparameters` to each. Not to a continued MLflow run: it holds them already,
    and MLflow refuses a param whose value changes (a key safe to change on resume)."""
    saved = _saved_runs(run_dir) if resumed else {}
    init_kwargs = {}
    for name in cfg.log.trackers:
        options = {**_defaults(name, run_dir), **cfg.log.tracker_options.get(name, {})}
        if name in saved and name in _CONTINUE:
            options |= _CONTINUE[name](saved[name])
        init_kwargs[name] = options
    init_kwargs.pop("tensorboard", None)  # made in log_with
    uri = init_kwargs.get("mlflow", {}).pop(MLFLOW_TRACKING_URI, None)
    if uri and accelerator.is_main_process:
        import mlflow

        mlflow.set_tracking_uri(uri)
    accelerator.init_trackers(cfg.log.project, init_kwargs=init_kwargs)
    if not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if not (tracker.name == "mlflow" and "mlflow" in saved):
            tracker.store_init_configuration(hyperparameters)
    started = {
        name: read(accelerator.get_tracker(name, unwrap=True))
        for name, read in _RUN_ID.items()
        if name in cfg.log.trackers
    }
    if started:
        with atomic.stop_on_failed_write(run_dir / TRACKER_RUNS):
            atomic.write_json(run_dir / TRACKER_RUNS, saved | started, indent=2)
