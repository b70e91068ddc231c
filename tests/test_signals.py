"""Signals from the first second (trainer/run/stop.py): `trainer train` catches SIGTERM,
SIGUSR1 and SIGINT from process start, also where it inherited SIGUSR1 ignored (the SLURM
scripts' `trap "" USR1`); a signal during set-up or resume stops before the first step
without a new checkpoint; one during an evaluation or a save is acted on after it; a first
Ctrl-C saves and exits 75, a second aborts at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, read_metrics
from interrupted_runs import cli, saved_steps, stop_in_process, subprocess_env

import trainer.run.train
from trainer.run.stop import EXIT_INTERRUPTED, EXIT_PREEMPTED


@pytest.fixture
def inherited_ignore():
    """SIGTERM and SIGUSR1 ignored, as a process started by `trap "" USR1; exec ...`
    finds them (and SIGINT too: a signal nobody catches must not stop the run either)."""
    numbers = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    previous = {n: signal.signal(n, signal.SIG_IGN) for n in numbers}
    yield
    for number, handler in previous.items():
        signal.signal(number, handler)


def signal_inside(monkeypatch, name: str, number: int, times: int = 1) -> None:
    """Send `number` to this process (`times` times) while trainer.run.train's `name`
    runs, the first time it is called."""
    real = getattr(trainer.run.train, name)
    sent = []

    def wrapped(*args, **kwargs):
        if not sent:
            sent.append(number)
            for _ in range(times):
                os.kill(os.getpid(), number)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer.run.train, name, wrapped)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_during_set_up_stops_before_the_first_step(
    run_config, tmp_path, monkeypatch, capfd, inherited_ignore, number
):
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 6})
    signal_inside(monkeypatch, "set_up", number)  # tokenizing, loading the model
    assert cli("train", config) == EXIT_PREEMPTED
    name = signal.Signals(number).name
    err = capfd.readouterr().err
    assert f"stopped by {name} before step 1 (nothing new saved); run the same command" in err
    assert saved_steps(tmp_path / "run") == []
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    monkeypatch.undo()
    assert cli("train", config) == 0  # and the next start trains the whole run


def test_signal_while_loading_the_checkpoint_keeps_it(
    run_config, tmp_path, monkeypatch, capfd, inherited_ignore
):
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 6})
    assert stop_in_process(config, 3) == EXIT_PREEMPTED
    signal_inside(monkeypatch, "load_checkpoint", signal.SIGUSR1)  # the resume's load_state
    assert cli("train", config) == EXIT_PREEMPTED
    assert "stopped by SIGUSR1 before step 4 (nothing new saved)" in capfd.readouterr().err
    assert saved_steps(tmp_path / "run") == [3]
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == 3


def test_first_ctrl_c_saves_and_exits_75(run_config, tmp_path, capfd):
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 8})
    assert stop_in_process(config, 3, number=signal.SIGINT) == EXIT_PREEMPTED
    assert "stopped by SIGINT at a saved checkpoint" in capfd.readouterr().err
    assert saved_steps(tmp_path / "run") == [3]


def test_second_ctrl_c_aborts_without_saving(run_config, tmp_path, monkeypatch, capfd):
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 8})
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where pytest runs in the background
    signal_inside(monkeypatch, "optimizer_step", signal.SIGINT, times=2)
    assert cli("train", config) == EXIT_INTERRUPTED
    assert "interrupted: aborted without saving (Ctrl-C twice)" in capfd.readouterr().err
    assert saved_steps(tmp_path / "run") == []
    assert signal.getsignal(signal.SIGINT) is before  # handlers put back


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_evaluation_is_acted_on_after_it(run_config, tmp_path, monkeypatch, number):
    """Signalled inside the evaluation after step 2: it ends (its record is logged), step 3
    trains, saves and stops."""
    config = run_config(
        "mlm",
        data={"validation": None, "validation_split": 0.2},
        train={"max_steps": 8},
        eval={"every_steps": 2},
    )
    signal_inside(monkeypatch, "evaluate", number)
    assert cli("train", config) == EXIT_PREEMPTED
    run_dir = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run_dir) if "eval_loss" in r] == [2]
    assert saved_steps(run_dir) == [3]


def test_signal_during_a_save_is_acted_on_after_it(run_config, tmp_path, monkeypatch):
    """Signalled (Ctrl-C) inside the scheduled save of step 2: that checkpoint completes,
    and the run stops at step 3 with another one."""
    config = run_config(
        "mlm", data={"validation": None}, train={"max_steps": 8}, checkpoint={"every_steps": 2}
    )
    signal_inside(monkeypatch, "save_checkpoint", signal.SIGINT)
    assert cli("train", config) == EXIT_PREEMPTED
    assert saved_steps(tmp_path / "run") == [2, 3]


def catches(pid: int, number: int) -> bool:
    """Whether process `pid` has a handler for signal `number` (Linux /proc SigCgt)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(
        next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16
    )
    return bool(mask >> (number - 1) & 1)


@pytest.mark.slow
def test_sigusr1_during_set_up_through_the_scripts_trap(run_config, tmp_path):
    """`trap "" USR1; exec python -m trainer train ...`, as each node's command in the SLURM
    scripts starts it: SIGUSR1 as soon as the process catches it (within its first second,
    long before the model is loaded) stops it before step 1, with exit 75."""
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 6})
    command = f'trap "" USR1; exec {sys.executable} -m trainer train {config}'
    process = subprocess.Popen(
        ["bash", "-c", command], cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while process.poll() is None and not catches(process.pid, signal.SIGUSR1):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGUSR1)
    _, err = process.communicate(timeout=300)
    assert process.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "stopped by SIGUSR1 before step 1 (nothing new saved)" in err
    assert saved_steps(tmp_path / "run") == []
