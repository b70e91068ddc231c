"""SLURM requeue: under a requeue-enabled SLURM job a preempted run asks `scontrol requeue`
for its validated job id once; a refused or missing scontrol still leaves exit 75."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import pytest
from interrupted_runs import (
    run_and_signal,
    saved_steps,
    stop_in_process,
    subprocess_env,
    trainer_command,
)

from trainer.run.resume import checkpoint_dir, problem_with
from trainer.run.stop import EXIT_PREEMPTED, slurm_job_to_requeue

# --- SLURM requeue -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"TRAINER_SLURM_REQUEUE": "1", "SLURM_JOB_ID": "12345"}, "12345"),
        (
            {
                "TRAINER_SLURM_REQUEUE": "1",
                "SLURM_JOB_ID": "780",
                "SLURM_ARRAY_JOB_ID": "777",
                "SLURM_ARRAY_TASK_ID": "3",
            },
            "777_3",
        ),
        ({"SLURM_JOB_ID": "12345"}, None),  # not a requeue-enabled job
        ({"TRAINER_SLURM_REQUEUE": "0", "SLURM_JOB_ID": "12345"}, None),
        ({"TRAINER_SLURM_REQUEUE": "1"}, None),  # not under SLURM
        ({"TRAINER_SLURM_REQUEUE": "1", "SLURM_JOB_ID": "1; rm -rf /"}, None),
        ({"TRAINER_SLURM_REQUEUE": "1", "SLURM_JOB_ID": "--help"}, None),
        ({"TRAINER_SLURM_REQUEUE": "1", "SLURM_JOB_ID": "12345\n"}, None),
        ({"TRAINER_SLURM_REQUEUE": "1", "SLURM_JOB_ID": ""}, None),
        (
            {
                "TRAINER_SLURM_REQUEUE": "1",
                "SLURM_JOB_ID": "780",
                "SLURM_ARRAY_JOB_ID": "777",
                "SLURM_ARRAY_TASK_ID": "3 4",
            },
            None,
        ),
    ],
)
def test_slurm_job_to_requeue(monkeypatch, env, expected):
    for name in ("TRAINER_SLURM_REQUEUE", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert slurm_job_to_requeue() == expected


def fake_scontrol(folder: Path, exit_code: int = 0) -> Path:
    """A `scontrol` that appends its arguments, one per line, to folder/scontrol.calls."""
    folder.mkdir(exist_ok=True)
    script = folder / "scontrol"
    calls = folder / "scontrol.calls"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" >> '{calls}'\nexit {exit_code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return calls


def slurm_env(monkeypatch, job: dict, path: str) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRAINER_SLURM_REQUEUE", "1")
    monkeypatch.setenv("PATH", path)
    for name, value in job.items():
        monkeypatch.setenv(name, value)


JOBS = [
    ({"SLURM_JOB_ID": "12345"}, "12345"),
    ({"SLURM_JOB_ID": "780", "SLURM_ARRAY_JOB_ID": "777", "SLURM_ARRAY_TASK_ID": "3"}, "777_3"),
]


@pytest.mark.parametrize(("job", "expected"), JOBS)
def test_sigusr1_under_slurm_requeues_the_job(
    run_config, tmp_path, monkeypatch, capfd, job, expected
):
    calls = fake_scontrol(tmp_path / "bin")
    slurm_env(monkeypatch, job, f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 8})
    assert stop_in_process(config, 3, number=signal.SIGUSR1) == EXIT_PREEMPTED
    err = capfd.readouterr().err
    assert f"stopped by SIGUSR1 at a saved checkpoint; requeued SLURM job {expected}\n" in err
    assert calls.read_text().splitlines() == ["requeue", expected]
    assert saved_steps(tmp_path / "run") == [3]


def test_refused_requeue_says_to_run_again(run_config, tmp_path, monkeypatch, capfd):
    calls = fake_scontrol(tmp_path / "bin", exit_code=1)
    slurm_env(monkeypatch, JOBS[0][0], f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 8})
    assert stop_in_process(config, 3) == EXIT_PREEMPTED
    assert calls.read_text().splitlines() == ["requeue", "12345"]
    err = capfd.readouterr().err
    assert "stopped by SIGTERM at a saved checkpoint; run the same command to resume\n" in err


def test_missing_scontrol_still_exits_75(run_config, tmp_path, monkeypatch, capfd):
    """TRAINER_SLURM_REQUEUE=1 where `scontrol` is not on PATH (e.g. inside a container):
    the checkpoint is saved, so the run must still leave with 75 and the usual hint, not a
    FileNotFoundError traceback."""
    (tmp_path / "empty").mkdir()
    slurm_env(monkeypatch, JOBS[0][0], str(tmp_path / "empty"))
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 8})
    assert stop_in_process(config, 3) == EXIT_PREEMPTED
    assert "run the same command to resume" in capfd.readouterr().err
    assert saved_steps(tmp_path / "run") == [3]


@pytest.mark.slow
@pytest.mark.parametrize(("job", "expected"), JOBS)
def test_sigusr1_under_slurm_as_a_process(run_config, tmp_path, job, expected):
    calls = fake_scontrol(tmp_path / "bin")
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 400})
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env = {
        **clean,
        **subprocess_env(),
        **job,
        "TRAINER_SLURM_REQUEUE": "1",
        "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
    }
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k in job}
    stopped = run_and_signal(
        trainer_command(config), tmp_path / "run", 2, number=signal.SIGUSR1, env=env
    )
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    assert f"requeued SLURM job {expected}" in stopped.stderr
    assert calls.read_text().splitlines() == ["requeue", expected]
    assert problem_with(checkpoint_dir(tmp_path / "run", saved_steps(tmp_path / "run")[-1])) is None
