"""launch.requeue: under a requeue-enabled SLURM job, training that stopped at a saved
checkpoint (exit 75) is requeued once, with its validated job id, by whoever started it:
`trainer launch` here, the batch script of `trainer submit` and the slurm/ templates in
test_slurm.py. A refused or missing scontrol still leaves exit 75 and the hint to run the
same command again. `trainer train` itself never calls scontrol."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from interrupted_runs import (
    children,
    cli,
    run_and_signal,
    saved_steps,
    stop_in_process,
    subprocess_env,
)

import launch.local
import launch.requeue
from launch.requeue import main as requeue_main, slurm_job_to_requeue
from trainer.run.resume import checkpoint_dir, problem_with
from trainer.run.stop import EXIT_PREEMPTED

RESUME = "run the same command to resume"
REFUSED = "could not requeue SLURM job 12345 (scontrol requeue refused or not found)"


# --- which job: a validated id from the environment ---------------------------------------


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


def train_in_this_process(monkeypatch, stop_at: int, number: int = signal.SIGTERM) -> None:
    """Stand in for the launcher `trainer launch` starts (launch.local.run_streaming): run
    its `trainer train ...` in this process, signalled so that it stops after `stop_at`,
    and hand its exit code back as the launcher's."""

    def run_here(command: list[str], env: dict) -> int:
        arguments = command[command.index("trainer") + 1 :]  # train CONFIG [overrides]
        return stop_in_process(Path(arguments[1]), stop_at, *arguments[2:], number=number)

    monkeypatch.setattr(launch.local, "run_streaming", run_here)


def with_fake_bin(tmp_path: Path) -> str:
    return f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"


# --- `trainer train` stops; it leaves the requeue to its launcher --------------------------


def test_train_under_slurm_stops_without_calling_scontrol(run_config, tmp_path, monkeypatch, capfd):
    calls = fake_scontrol(tmp_path / "bin")
    slurm_env(monkeypatch, JOBS[0][0], with_fake_bin(tmp_path))
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 8})
    assert stop_in_process(config, 3, number=signal.SIGUSR1) == EXIT_PREEMPTED
    err = capfd.readouterr().err
    assert f"stopped by SIGUSR1 at a saved checkpoint; {RESUME}\n" in err
    assert "SLURM" not in err
    assert not calls.exists()
    assert saved_steps(tmp_path / "run") == [3]


# --- `trainer launch` requeues after its processes exit with 75 ----------------------------


@pytest.mark.parametrize(("job", "expected"), JOBS)
def test_sigusr1_under_slurm_requeues_the_job(
    run_config, tmp_path, monkeypatch, capfd, job, expected
):
    calls = fake_scontrol(tmp_path / "bin")
    slurm_env(monkeypatch, job, with_fake_bin(tmp_path))
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 8})
    train_in_this_process(monkeypatch, 3, signal.SIGUSR1)
    assert cli("launch", config, "--cluster", "cpu-debug") == EXIT_PREEMPTED
    err = capfd.readouterr().err
    assert f"stopped by SIGUSR1 at a saved checkpoint; {RESUME}\n" in err
    assert f"requeued SLURM job {expected}: it resumes from the saved checkpoint\n" in err
    assert calls.read_text().splitlines() == ["requeue", expected]
    assert saved_steps(tmp_path / "run") == [3]


def test_refused_requeue_says_to_run_again(run_config, tmp_path, monkeypatch, capfd):
    calls = fake_scontrol(tmp_path / "bin", exit_code=1)
    slurm_env(monkeypatch, JOBS[0][0], with_fake_bin(tmp_path))
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 8})
    train_in_this_process(monkeypatch, 3)
    assert cli("launch", config, "--cluster", "cpu-debug") == EXIT_PREEMPTED
    assert calls.read_text().splitlines() == ["requeue", "12345"]
    err = capfd.readouterr().err
    assert f"stopped by SIGTERM at a saved checkpoint; {RESUME}\n" in err
    assert f"{REFUSED}; {RESUME}\n" in err


def test_missing_scontrol_still_exits_75(run_config, tmp_path, monkeypatch, capfd):
    """TRAINER_SLURM_REQUEUE=1 where `scontrol` is not on PATH (e.g. inside a container):
    the checkpoint is saved, so the run must still leave with 75 and the usual hint, not a
    FileNotFoundError traceback."""
    (tmp_path / "empty").mkdir()
    slurm_env(monkeypatch, JOBS[0][0], str(tmp_path / "empty"))
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 8})
    train_in_this_process(monkeypatch, 3)
    assert cli("launch", config, "--cluster", "cpu-debug") == EXIT_PREEMPTED
    err = capfd.readouterr().err
    assert f"{REFUSED}; {RESUME}\n" in err
    assert "Traceback" not in err
    assert saved_steps(tmp_path / "run") == [3]


@pytest.mark.parametrize("code", [0, 1, 2])
def test_launch_requeues_only_after_75(run_config, tmp_path, monkeypatch, code):
    calls = fake_scontrol(tmp_path / "bin")
    slurm_env(monkeypatch, JOBS[0][0], with_fake_bin(tmp_path))
    monkeypatch.setattr(launch.local, "run_streaming", lambda command, env: code)
    assert cli("launch", run_config("mlm"), "--cluster", "cpu-debug") == code
    assert not calls.exists()


def test_launch_outside_slurm_does_not_requeue(run_config, tmp_path, monkeypatch, capfd):
    calls = fake_scontrol(tmp_path / "bin")
    slurm_env(monkeypatch, {}, with_fake_bin(tmp_path))  # TRAINER_SLURM_REQUEUE=1, no job
    monkeypatch.setattr(launch.local, "run_streaming", lambda command, env: EXIT_PREEMPTED)
    assert cli("launch", run_config("mlm"), "--cluster", "cpu-debug") == EXIT_PREEMPTED
    assert not calls.exists()
    assert "requeue" not in capfd.readouterr().err


# --- `python -m launch.requeue`, what the batch scripts run after exit 75 -------------------


@pytest.mark.parametrize(
    ("job", "scontrol_code", "code", "message"),
    [
        ({"SLURM_JOB_ID": "12345"}, 0, 0, "requeued SLURM job 12345: it resumes from"),
        ({"SLURM_JOB_ID": "12345"}, 1, 1, REFUSED),
        ({"SLURM_JOB_ID": "1; rm -rf /"}, 0, 1, "not requeued: not a requeue-enabled SLURM job"),
    ],
    ids=["requeued", "refused", "invalid-id"],
)
def test_requeue_entry_point(tmp_path, monkeypatch, capsys, job, scontrol_code, code, message):
    calls = fake_scontrol(tmp_path / "bin", exit_code=scontrol_code)
    slurm_env(monkeypatch, job, with_fake_bin(tmp_path))
    assert requeue_main([]) == code
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    if code == 0 or scontrol_code:
        assert calls.read_text().splitlines() == ["requeue", "12345"]
    else:
        assert not calls.exists(), "an id that does not validate never reaches scontrol"
    if code:
        assert err.endswith(f"; {RESUME}\n")


def test_requeue_entry_point_as_the_batch_script_runs_it(tmp_path, monkeypatch):
    """`python -m launch.requeue` in its own process (its module is `__main__` there): the
    line still reaches stderr."""
    fake_scontrol(tmp_path / "bin")
    slurm_env(monkeypatch, {"SLURM_JOB_ID": "12345"}, with_fake_bin(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "launch.requeue"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == "requeued SLURM job 12345: it resumes from the saved checkpoint\n"


# --- as processes: `trainer launch` under a SLURM job that signals all its processes --------


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: the launcher and the training processes."""
    found = children(pid)
    return found + [d for child in found for d in descendants(child)]


@pytest.mark.slow
@pytest.mark.parametrize(("job", "expected"), JOBS)
def test_sigusr1_under_slurm_as_a_process(run_config, tmp_path, job, expected):
    """SIGUSR1 to `trainer launch`, its launcher and the training process at once (as SLURM
    signals every process of a step): the two launchers outlive the checkpoint, the run
    exits with 75 and the job is requeued once."""
    calls = fake_scontrol(tmp_path / "bin")
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 400})
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env = {
        **clean,
        **subprocess_env(),
        **job,
        "TRAINER_SLURM_REQUEUE": "1",
        "PATH": with_fake_bin(tmp_path),
    }
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k in job}
    command = [sys.executable, "-m", "trainer", "launch", str(config), "--cluster", "cpu-debug"]
    stopped = run_and_signal(
        command,
        tmp_path / "run",
        2,
        number=signal.SIGUSR1,
        env=env,
        target=lambda process: [process.pid, *descendants(process.pid)],
    )
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    assert f"requeued SLURM job {expected}" in stopped.stderr
    assert calls.read_text().splitlines() == ["requeue", expected]
    assert problem_with(checkpoint_dir(tmp_path / "run", saved_steps(tmp_path / "run")[-1])) is None


def test_hung_scontrol_is_given_up_after_a_timeout(tmp_path, monkeypatch, capsys):
    """A slurmctld that never answers: scontrol is killed after SCONTROL_TIMEOUT_S and the
    batch script goes on (exit 1, the hint to run again) instead of waiting forever."""
    (tmp_path / "bin").mkdir()
    script = tmp_path / "bin" / "scontrol"
    script.write_text("#!/bin/sh\nexec sleep 20\n")
    script.chmod(0o755)
    slurm_env(monkeypatch, JOBS[0][0], with_fake_bin(tmp_path))
    monkeypatch.setattr(launch.requeue, "SCONTROL_TIMEOUT_S", 0.5)
    started = time.monotonic()
    assert requeue_main([]) == 1
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    expected = "could not requeue SLURM job 12345 (scontrol requeue did not answer within 0.5 s)"
    assert err == f"warning: {expected}; {RESUME}\n"  # a warning: --quiet keeps it
