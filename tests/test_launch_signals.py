"""`trainer launch` and `python -m launch.node` (both launch.local.run_streaming) forward
SIGTERM, SIGUSR1 and SIGINT to the training processes, as SIGUSR1 to the launcher's own
process group (the launcher ignores it, the training processes stop on it), again every
few seconds for processes not up yet; Ctrl-C twice kills them at once. A stand-in launcher
starts one stand-in training process that uses the real StopFlag."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from trainer.run.stop import EXIT_INTERRUPTED, EXIT_PREEMPTED

# The training process: stops on the flag with 75 (after `SAVE_S`, a long save), or gives
# up after 40 s with 0.
WORKER = """
import os, sys, time
from pathlib import Path
from trainer.run.stop import StopFlag
folder, save_s = Path(sys.argv[1]), float(sys.argv[2])
flag = StopFlag().install()
(folder / "worker.pid").write_text(str(os.getpid()))
end = time.monotonic() + 40
while time.monotonic() < end and not flag.requested():
    time.sleep(0.05)
(folder / "reason").write_text(str(flag.reason))
time.sleep(save_s)
sys.exit(75 if flag.reason else 0)
"""
# The launcher: starts the training process after `DELAY_S` and exits with its code; it
# handles no signal itself (torchrun's own SIGTERM handling is what the forwarding avoids).
LAUNCHER = """
import subprocess, sys, time
from pathlib import Path
folder, delay = Path(sys.argv[1]), float(sys.argv[2])
(folder / "launcher.up").touch()
time.sleep(delay)
sys.exit(subprocess.call([sys.executable, "-c", sys.argv[3], *sys.argv[1:2], sys.argv[4]]))
"""


def start(folder: Path, delay_s: float = 0.0, save_s: float = 0.0) -> subprocess.Popen:
    command = [sys.executable, "-m", "launch.node", sys.executable, "-c", LAUNCHER]
    command += [str(folder), str(delay_s), WORKER, str(save_s)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_signal_to_the_parent_only_stops_the_training_processes(tmp_path, number):
    """`kill PID` (or docker stop, or Ctrl-C) reaches only the parent: its training
    process saves and exits 75, and so does the parent; nothing is orphaned."""
    node = start(tmp_path)
    wait_for(tmp_path / "worker.pid")
    node.send_signal(number)
    _, err = node.communicate(timeout=30)
    assert node.returncode == EXIT_PREEMPTED, err
    assert (tmp_path / "reason").read_text() == "SIGUSR1"
    assert f"launch: {signal.Signals(number).name}: the training processes save" in err
    assert not alive(int((tmp_path / "worker.pid").read_text()))


def test_signal_before_the_training_processes_are_up_reaches_them(tmp_path):
    """SIGTERM while the launcher is still starting its processes: the forwarder sends it
    again until they exit, so the processes started later stop too."""
    node = start(tmp_path, delay_s=1.0)
    wait_for(tmp_path / "launcher.up")
    node.send_signal(signal.SIGTERM)
    _, err = node.communicate(timeout=30)
    assert node.returncode == EXIT_PREEMPTED, err
    assert (tmp_path / "reason").read_text() == "SIGUSR1"


def test_second_ctrl_c_kills_the_training_processes_at_once(tmp_path):
    node = start(tmp_path, save_s=60)  # a save that takes a minute
    wait_for(tmp_path / "worker.pid")
    node.send_signal(signal.SIGINT)
    wait_for(tmp_path / "reason")
    started = time.monotonic()
    node.send_signal(signal.SIGINT)
    _, err = node.communicate(timeout=30)
    assert time.monotonic() - started < 10
    assert node.returncode == EXIT_INTERRUPTED, err
    assert "launch: second SIGINT: killing the training processes" in err
    assert not alive(int((tmp_path / "worker.pid").read_text()))
