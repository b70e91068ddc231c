"""The experiment trackers a run can log to: accelerate's own, each an optional extra.

Torch-free (config validation imports it): an unknown tracker, an option for a tracker the
run does not log to, or a tracker whose package is missing is one config error, before
anything heavy loads, instead of a tracker accelerate drops without a word (it skips one
whose package is absent) or a TypeError at the first log line. The names are those of
`accelerate.tracking.LOGGER_TYPE_TO_CLASS` (tests/test_trackers.py checks they agree).
"""

from __future__ import annotations

# tracker -> (import names accelerate looks for, any one will do; steadytrain's pip extra)
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
    "comet_ml": (("comet_ml",), "comet_ml"),
    "aim": (("aim",), "aim"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
}
# Init arguments steadytrain fills, which an option may not name again (a TypeError at the
# first start, after the model loaded): the tracker's first argument and the project, from
# log.project; where TensorBoard and Aim write, which is the run directory.
FILLED = {
    "tensorboard": ("run_name", "logging_dir", "log_dir"),
    "wandb": ("run_name", "project"),
    "mlflow": ("experiment_name",),
    "comet_ml": ("run_name", "project_name"),
    "aim": ("run_name", "logging_dir", "repo"),
    "clearml": ("run_name",),
    "dvclive": ("run_name",),
    "swanlab": ("run_name", "project"),
    "trackio": ("run_name", "project"),
}
# Our own option, not an argument of accelerate's MLflowTracker: where MLflow stores the
# run (mlflow.set_tracking_uri), so that a config names it rather than the environment.
MLFLOW_TRACKING_URI = "tracking_uri"


def check_log_trackers(trackers: list, options: dict, errors: list[str]) -> None:
    """`log.trackers` names accelerate's trackers; `log.tracker_options` holds a mapping of
    init arguments per tracker, only for trackers the run logs to."""
    for tracker in trackers:
        if tracker not in TRACKERS:
            errors.append(f"log.trackers: '{tracker}' is not one of {', '.join(TRACKERS)}")
    for name, value in options.items():
        key = f"log.tracker_options.{name}"
        if name not in trackers:
            listed = ", ".join(map(str, trackers)) or "none"
            errors.append(f"{key}: {name} is not in log.trackers ({listed}); add it or drop this")
        elif not isinstance(value, dict):
            errors.append(f"{key}: must be a mapping of {name}'s init arguments, got {value!r}")
        else:
            errors += [
                f"{key}.{option}: set by steadytrain (the project is log.project, the files "
                "go to output_dir); leave it out"
                for option in value
                if option in FILLED.get(name, ())
            ]


def missing_line(tracker: str) -> str:
    """The error for a tracker whose package is not installed: the extra that brings it."""
    extra = TRACKERS[tracker][1]
    return f"log.trackers: {tracker} is not installed; pip install 'steadytrain[{extra}]'"
