"""log.trackers: accelerate's trackers, real and offline. MLflow into a local SQLite store
read back with MlflowClient, W&B in offline mode read back from its run file; a resumed run
continues the same tracker run; names, options and missing packages are config errors."""

from __future__ import annotations

import importlib.util
import inspect
import json
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from conftest import read_metrics
from interrupted_runs import cli, stop_in_process, subprocess_env, trainer_command

from trainer.config import build_config
from trainer.errors import UserError
from trainer.run.stop import EXIT_PREEMPTED
from trainer.run.tracker_runs import TRACKER_RUNS
from trainer.trackers import FILLED, TRACKERS

mlflow = pytest.importorskip("mlflow")
wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
from mlflow.tracking import MlflowClient  # noqa: E402

STEPS = 4


def flat_metrics(records: list[dict]) -> dict[str, dict[int, float]]:
    """metrics.jsonl as key -> {step: value}, nested keys joined by `/` (what trackers get)."""
    found: dict[str, dict[int, float]] = defaultdict(dict)

    def add(values: dict, step: int, prefix: str = "") -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                add(value, step, f"{prefix}{key}/")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                found[f"{prefix}{key}"][step] = float(value)

    for record in records:
        add({k: v for k, v in record.items() if k != "step"}, record["step"])
    return dict(found)


def resolved_params(run_dir: Path) -> dict[str, str]:
    """The saved resolved config (config.yaml) as `section.key` -> text, scalars only."""
    params = {}
    for section, values in yaml.safe_load((run_dir / "config.yaml").read_text()).items():
        if not isinstance(values, dict):
            params[section] = str(values)
            continue
        for key, value in values.items():
            if isinstance(value, (int, float, str, bool)):
                params[f"{section}.{key}"] = str(value)
    return params


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> str:
    """One SQLite store for this module's runs (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def mlflow_config(run_config, store: str, project: str, **sections) -> Path:
    options = {"mlflow": {"tracking_uri": store}}
    log = {"every_steps": 1, "trackers": ["mlflow"], "tracker_options": options}
    return run_config(
        "classification", train={"max_steps": STEPS}, log={**log, "project": project}, **sections
    )


def mlflow_runs(store: str, project: str) -> list:
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(project)
    return client.search_runs([experiment.experiment_id]) if experiment else []


def mlflow_history(store: str, run) -> dict[str, dict[int, float]]:
    client = MlflowClient(tracking_uri=store)
    history: dict[str, dict[int, float]] = {}
    for key in run.data.metrics:
        entries = client.get_metric_history(run.info.run_id, key)
        steps = [m.step for m in entries]
        assert len(steps) == len(set(steps)), f"{key} logged twice at a step: {steps}"
        history[key] = {m.step: m.value for m in entries}
    return history


def test_the_tracker_names_are_accelerates_and_what_it_fills_is_known():
    assert set(TRACKERS) == set(LOGGER_TYPE_TO_CLASS) == set(FILLED)
    for name, tracker in LOGGER_TYPE_TO_CLASS.items():
        parameters = list(inspect.signature(tracker.__init__).parameters)
        assert parameters[1] in FILLED[name], name  # accelerate passes the project there
        if tracker.requires_logging_directory:
            assert parameters[2] == "logging_dir" and "logging_dir" in FILLED[name], name


def test_mlflow_gets_every_logged_number_and_the_resolved_config(
    run_config, tmp_path, mlflow_store
):
    config = mlflow_config(run_config, mlflow_store, "st-mlflow-one")
    assert cli("train", config) == 0
    run_dir = tmp_path / "run"
    (run,) = mlflow_runs(mlflow_store, "st-mlflow-one")
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    expected = flat_metrics(read_metrics(run_dir))
    assert sorted(expected["loss"]) == list(range(1, STEPS + 1))
    assert mlflow_history(mlflow_store, run) == expected
    assert run.data.params == resolved_params(run_dir)
    assert json.loads((run_dir / TRACKER_RUNS).read_text()) == {"mlflow": run.info.run_id}


def test_an_interrupted_and_resumed_run_is_one_mlflow_run_with_every_step(
    run_config, tmp_path, mlflow_store
):
    config = mlflow_config(run_config, mlflow_store, "st-mlflow-resumed")
    assert stop_in_process(config, 2) == EXIT_PREEMPTED
    (first,) = mlflow_runs(mlflow_store, "st-mlflow-resumed")
    assert sorted(mlflow_history(mlflow_store, first)["loss"]) == [1, 2]
    # a key safe to change on resume: MLflow would refuse the param's new value
    assert cli("train", config, "log.every_steps=2") == 0
    (run,) = mlflow_runs(mlflow_store, "st-mlflow-resumed")
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    history = mlflow_history(mlflow_store, run)
    assert history == flat_metrics(read_metrics(tmp_path / "run"))
    assert sorted(history["loss"]) == [1, 2, 4]  # every step logged, each once
    assert run.data.params["log.every_steps"] == "1"  # as the run started


@pytest.mark.slow  # torchrun, two processes: ~30 s of imports on 2 shared cores
def test_two_processes_log_one_mlflow_run_from_rank_0(run_config, tmp_path, mlflow_store):
    config = mlflow_config(run_config, mlflow_store, "st-mlflow-two")
    result = subprocess.run(
        trainer_command(config, processes=2), env=subprocess_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = mlflow_runs(mlflow_store, "st-mlflow-two")
    assert mlflow_history(mlflow_store, run) == flat_metrics(read_metrics(tmp_path / "run"))


# --- W&B, offline -------------------------------------------------------------------------


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (`run-ID.wandb`). Written by wandb's Go core in
    LevelDB's log format after a 7-byte header; wandb 0.31 ships no Python reader of it
    (the old `wandb.sdk.internal.datastore` is gone), so the 20 lines are here."""
    data, block, position, pending, records = path.read_bytes(), 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left < 7 or (kind == 0 and length == 0):  # a block's zero-filled tail
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(folder: Path) -> tuple[str, dict[str, dict[int, float]], dict]:
    """(run id, key -> {step: value} of the logged numbers, the config) of an offline run."""
    history: dict[str, dict[int, float]] = defaultdict(dict)
    config, run_id = {}, None
    for record in wandb_records(next(folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
        elif kind == "config":
            config |= {item.key: json.loads(item.value_json) for item in record.config.update}
        elif kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history[key][record.history.step.num] = json.loads(item.value_json)
    return run_id, dict(history), config


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the default: the run directory
    return tmp_path / "run" / "wandb"


def test_wandb_offline_holds_every_logged_number_and_resume_reuses_the_id(
    run_config, tmp_path, wandb_offline
):
    log = {"every_steps": 1, "trackers": ["wandb"], "tracker_options": {"wandb": {"tags": ["t"]}}}
    config = run_config("classification", train={"max_steps": STEPS}, log=log)
    assert stop_in_process(config, 2) == EXIT_PREEMPTED
    assert cli("train", config) == 0
    first, second = sorted(wandb_offline.glob("offline-run-*"))  # one folder per start
    (first_id, first_history, first_config) = wandb_run(first)
    (second_id, second_history, _) = wandb_run(second)
    saved = json.loads((tmp_path / "run" / TRACKER_RUNS).read_text())
    assert first_id == second_id == saved["wandb"]
    assert first.name.endswith(first_id) and second.name.endswith(first_id)
    keys = first_history.keys() | second_history.keys()
    together = {key: first_history.get(key, {}) | second_history.get(key, {}) for key in keys}
    assert together == flat_metrics(read_metrics(tmp_path / "run"))
    assert sorted(first_history["loss"]) == [1, 2] and sorted(second_history["loss"]) == [3, 4]
    params = resolved_params(tmp_path / "run")
    assert {key: str(value) for key, value in first_config.items() if key in params} == params


# --- config errors --------------------------------------------------------------------------


def test_unknown_tracker_and_options_for_an_unlisted_tracker_are_one_error(run_config):
    raw = yaml.safe_load(run_config("classification").read_text())
    raw["log"] = {"trackers": ["mlfow"], "tracker_options": {"wandb": {"entity": "e"}}}
    with pytest.raises(UserError) as caught:
        build_config(raw)
    assert str(caught.value) == (
        f"log.trackers: 'mlfow' is not one of {', '.join(TRACKERS)}; "
        "log.tracker_options.wandb: wandb is not in log.trackers (mlfow); add it or drop this"
    )
    raw["log"] = {"trackers": ["wandb"], "tracker_options": {"wandb": "e"}}
    with pytest.raises(UserError, match=r"log\.tracker_options\.wandb: must be a mapping"):
        build_config(raw)
    # accelerate passes log.project there: a TypeError once the model is loaded, else
    raw["log"] = {"trackers": ["mlflow"], "tracker_options": {"mlflow": {"experiment_name": "x"}}}
    with pytest.raises(UserError, match=r"mlflow\.experiment_name: set by steadytrain"):
        build_config(raw)


@pytest.mark.parametrize("tracker", ["mlflow", "aim"])  # aim: not installed here
def test_a_tracker_whose_package_is_missing_is_one_line_before_the_model_loads(
    capsys, run_config, monkeypatch, tracker
):
    import trainer.run.train

    if tracker == "mlflow":
        monkeypatch.setitem(sys.modules, "mlflow", None)  # what find_spec sees of a missing one
    elif importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed")
    monkeypatch.setattr(trainer.run.train, "set_up", lambda cfg: pytest.fail("set up"))
    code = cli("train", run_config("classification"), f"log.trackers=[tensorboard,{tracker}]")
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"error: log.trackers: {tracker} is not installed; pip install 'steadytrain[{tracker}]'\n"
    )
