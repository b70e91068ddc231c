"""trainer.run.stop: a run stopped by SIGTERM / SIGUSR1 or by train.max_time saves at the
next step boundary, exits 75 and resumes exactly, also in its own processes and under
torchrun, and at an epoch boundary with loss sums not yet logged."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
from conftest import REPO, make_run_config, read_metrics
from interrupted_runs import (
    EXACT,
    assert_same_tensors,
    children,
    cli,
    comparable,
    final_weights,
    loop_state,
    run_and_signal,
    saved_steps,
    stop_in_process,
    subprocess_env,
    trainer_command,
)

import trainer.run.stop
import trainer.run.train
from trainer.commands.report import training_seconds
from trainer.run.stop import EXIT_PREEMPTED, StopFlag, TimeBudget

# --- exact resume through `python -m trainer`, in their own processes -----------------------


def _kill_and_resume(tmp_path, tiny_models_by_task, data_dir, processes, target=None):
    runs = {}
    for name in ("ref", "cut"):
        (tmp_path / name).mkdir()
        runs[name] = make_run_config(tmp_path / name, "mlm", tiny_models_by_task, data_dir, **EXACT)
    ref, cut = tmp_path / "ref" / "run", tmp_path / "cut" / "run"
    done = subprocess.run(
        trainer_command(runs["ref"], processes), cwd=REPO, env=subprocess_env(), capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]

    stopped = run_and_signal(trainer_command(runs["cut"], processes), cut, 3, target=target)
    if processes == 1:
        assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    assert "at a saved checkpoint" in stopped.stderr, stopped.stderr[-3000:]
    stop_step = saved_steps(cut)[-1]
    total = json.loads((ref / "run_summary.json").read_text())["total_steps"]
    assert 3 <= stop_step < total
    assert not (cut / "final").exists()

    resumed = subprocess.run(
        trainer_command(runs["cut"], processes), cwd=REPO, env=subprocess_env(), capture_output=True
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert f"(step {stop_step})" in resumed.stderr.decode()
    assert comparable(cut) == comparable(ref)
    assert_same_tensors(final_weights(cut), final_weights(ref))
    return stopped


@pytest.mark.slow
def test_sigterm_and_resume_as_processes(tmp_path, tiny_models_by_task, data_dir):
    _kill_and_resume(tmp_path, tiny_models_by_task, data_dir, 1)


@pytest.mark.slow
def test_sigterm_to_one_rank_and_resume_under_torchrun(tmp_path, tiny_models_by_task, data_dir):
    # The signal reaches rank 1 only: rank 0 learns of it in the step's all-reduce.
    stopped = _kill_and_resume(
        tmp_path, tiny_models_by_task, data_dir, 2, target=lambda p: children(p.pid)[1:]
    )
    assert "exitcode  : 75" in stopped.stderr or stopped.returncode == EXIT_PREEMPTED


# --- the stop at an epoch boundary, with unlogged loss sums in the checkpoint ---------------


def test_stop_at_the_end_of_an_epoch_resumes_exactly(tmp_path, tiny_models_by_task, data_dir):
    """Stopped on the last step of epoch 1 (before the epoch-end evaluation), with
    log.every_steps=3 so that the checkpoint holds loss sums not yet logged."""
    sections = {**EXACT, "eval": {"every_steps": 0}, "log": {"every_steps": 3, "trackers": []}}
    configs = {}
    for name in ("ref", "cut"):
        (tmp_path / name).mkdir()
        configs[name] = make_run_config(
            tmp_path / name, "mlm", tiny_models_by_task, data_dir, **sections
        )
    assert cli("train", configs["ref"]) == 0
    ref, cut = tmp_path / "ref" / "run", tmp_path / "cut" / "run"
    steps_per_epoch = json.loads((ref / "run_summary.json").read_text())["steps_per_epoch"]
    assert steps_per_epoch % 3 != 0, "the stop should leave unlogged sums"

    assert stop_in_process(configs["cut"], steps_per_epoch) == EXIT_PREEMPTED
    state = loop_state(cut, steps_per_epoch)
    assert (state["epoch"], state["step_in_epoch"]) == (0, steps_per_epoch)
    assert not any("eval_loss" in r for r in read_metrics(cut))
    assert cli("train", configs["cut"]) == 0
    assert comparable(cut) == comparable(ref)
    assert_same_tensors(final_weights(cut), final_weights(ref))


# --- train.max_time ------------------------------------------------------------------------


def slow_set_up(monkeypatch, seconds: float) -> None:
    """Make the set-up of `trainer train` take `seconds` longer."""
    real = trainer.run.train.set_up

    def set_up(cfg):
        time.sleep(seconds)
        return real(cfg)

    monkeypatch.setattr(trainer.run.train, "set_up", set_up)


def test_max_time_saves_exits_75_and_resumes(run_config, tmp_path, monkeypatch, capfd):
    """Stopped by its time limit, counted from the start of `trainer train` (a set-up made
    a second longer included), with room for the last step and save; resumed, its training
    clock (elapsed_s) continues."""
    config = run_config(
        "mlm",
        data={"validation": None},
        # a constant LR: the resume may then shorten the run (see test_resume.py)
        train={"max_steps": 100000, "max_time": "00:00:05", "scheduler": "constant"},
        checkpoint={"every_steps": 10},  # saves measured before the one at the stop
        log={"every_steps": 1, "trackers": []},
    )
    with monkeypatch.context() as patch:
        slow_set_up(patch, 1.0)
        started = time.monotonic()
        assert cli("train", config) == EXIT_PREEMPTED
        # set-up, training and the last save within the limit (0.25 s of slack, and as much
        # again for the variation of a loaded machine); counted from the loop's start: 6.4 s
        assert time.monotonic() - started < 5.5
    err = capfd.readouterr().err
    assert "stopped by train.max_time at a saved checkpoint; run the same command to resume" in err
    run_dir = tmp_path / "run"
    stop = saved_steps(run_dir)[-1]
    assert 10 < stop < 100000
    before = read_metrics(run_dir)
    assert max(r["step"] for r in before) == stop
    assert cli("train", config, f"train.max_steps={stop + 2}", "train.max_time=null") == 0
    assert f"(step {stop})" in capfd.readouterr().err
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, stop + 3))
    assert json.loads((run_dir / "eval_results.json").read_text())["steps"] == stop + 2
    clock = [r["elapsed_s"] for r in records]
    assert clock == sorted(clock) and clock[-2] > before[-1]["elapsed_s"]
    assert training_seconds(records) == clock[-1]


def test_max_time_counts_the_set_up(run_config, tmp_path, monkeypatch, capfd):
    """A budget spent before the first step is an error (exit 2), not a stop that a requeue
    would repeat forever."""
    config = run_config("mlm", data={"validation": None}, train={"max_time": "00:00:02"})
    slow_set_up(monkeypatch, 2.5)
    assert cli("train", config) == 2
    errors = [line for line in capfd.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1
    assert re.fullmatch(
        r"error: train.max_time: 00:00:02 \(2 s\) is spent before the first step: the set-up "
        r"took [0-9.]+ s and the stop keeps [0-9.]+ s for a step and a save; raise it",
        errors[0],
    ), errors
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_time_budget_runs_from_process_start(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(trainer.run.stop.time, "monotonic", lambda: clock[0])
    flag = StopFlag()
    clock[0] = 160.0  # a minute of set-up
    flag.limit_time(90)
    assert not flag.requested()
    clock[0] = 185.0  # 85 s since the start, and the slack is 5% of 90 s
    assert not flag.requested()
    clock[0] = 186.0
    assert flag.requested() and flag.reason == "train.max_time"


def test_the_time_budget_keeps_room_for_a_step_an_evaluation_and_a_save(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(trainer.run.stop.time, "monotonic", lambda: clock[0])
    budget = TimeBudget(0.0, seconds=3600)
    budget.note_step(120.0)  # the first step (warm-up, compilation): not counted
    budget.note_step(2.0)
    budget.note_step(1.0)
    budget.eval_s, budget.save_s = 50.0, 40.0
    assert budget.margin_s() == 30 + 2 + 40  # the slack is 30 s at most
    assert budget.margin_s(evaluating=True) == 30 + 2 + 40 + 50
    clock[0] = 3600 - 72 - 1
    assert not budget.spent() and budget.spent(evaluating=True)
    clock[0] = 3600 - 72 + 1
    assert budget.spent()
    assert TimeBudget(0.0, seconds=10).margin_s() == 0.5  # 5% of a limit of seconds
    assert not TimeBudget(0.0).spent()  # no limit
