"""The run directory's guards (trainer/run/rundir.py) and the collective timeout: a second
run into a live run's output_dir is refused, a dead run's lock is taken over, processes
that do not share one output_dir are refused before any of them resumes, and a process
that never joins a collective fails the job within train.collective_timeout, with a line
that names the collective."""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, reset_accelerate
from interrupted_runs import subprocess_env
from rank_faults import EXITED, STARTED

import trainer.run.rundir as rundir
from launch.local import free_port
from trainer.cli import main
from trainer.errors import UserError

TINY = {
    "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 2},
    "eval": {"every_steps": 0},
    "log": {"trackers": []},
}
HOLD = "import sys, time; from pathlib import Path; from trainer.run.rundir import take_lock; "
HOLD += "take_lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)"


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the lock on run_dir until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_is_refused_while_the_first_lives_and_a_dead_ones_lock_taken_over(
    run_config, capsys
):
    config = run_config("mlm", **TINY)
    run_dir = config.parent / "run"
    holder = hold_lock(run_dir)
    try:
        assert cli("train", config) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"error: output_dir: {run_dir} is in use by another run (pid {holder.pid} on "
            f"{socket.gethostname()}); wait for it to end or use another output_dir (if that "
            f"run is dead, delete {run_dir / rundir.OWNER_NAME})"
        ]
        assert not (run_dir / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    assert str(holder.pid) in (run_dir / rundir.OWNER_NAME).read_text()  # left by the dead
    assert cli("train", config) == 0
    assert (run_dir / "final").is_dir()


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    return int(done.stdout)


def test_without_flock_the_owner_file_decides(tmp_path, monkeypatch):
    """Mounts that refuse flock (ENOLCK): a live owner on this host keeps the lock, a dead
    one's is taken over, one on another host is kept (we can not tell)."""

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_flock)
    run_dir = tmp_path / "run"
    owner = run_dir / rundir.OWNER_NAME
    for pid, host, refused in [
        (os.getppid(), socket.gethostname(), True),
        (dead_pid(), socket.gethostname(), False),
        (dead_pid(), "another-node", True),
    ]:
        run_dir.mkdir(exist_ok=True)
        owner.write_text(f'{{"pid": {pid}, "host": "{host}"}}')
        if refused:
            with pytest.raises(UserError, match=f"in use by another run \\(pid {pid} on {host}\\)"):
                rundir.take_lock(run_dir)
        else:
            rundir.take_lock(run_dir).release()
            assert list(run_dir.iterdir()) == [], "a run that ended leaves no lock file behind"


def torchrun(mode: str, config: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += [
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "rank_faults.py"),
        mode,
        str(config),
    ]
    env = subprocess_env(PYTHONPATH=f"{REPO}:{REPO / 'tests'}")
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_processes_that_do_not_share_the_output_dir_are_refused(run_config):
    config = run_config("mlm", **TINY)
    done = torchrun("own-dir", config)
    assert done.returncode != 0
    run_dir = config.parent / "run"
    expected = (
        f"error: output_dir: {run_dir} is not one directory for all processes: the main "
        f"process on {socket.gethostname()} does not see the files of rank 1 on "
        f"{socket.gethostname()}; output_dir must be on a filesystem all nodes share"
    )
    lines = done.stderr.splitlines()
    assert expected in lines, done.stderr[-3000:]
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr
    for folder in (run_dir, Path(f"{run_dir}-rank1")):
        assert not (folder / "metrics.jsonl").exists()
        assert not (folder / "checkpoints").exists()


@pytest.mark.slow
def test_a_process_that_never_joins_a_collective_fails_the_job_within_the_timeout(run_config):
    config = run_config("mlm", **{**TINY, "train": {**TINY["train"], "collective_timeout": 10}})
    done = torchrun("hang", config)
    lines = done.stderr.splitlines()
    stamps = {
        mark: [float(s.split()[-1]) for s in lines if mark in s] for mark in (STARTED, EXITED)
    }
    assert done.returncode != 0 and all(stamps.values()), done.stderr[-4000:]
    started, exited = stamps[STARTED][0], stamps[EXITED][0]
    assert exited - started < 10 + 10, "rank 0 failed within the timeout (and a margin)"
    line = next(s for s in done.stderr.splitlines() if s.startswith("error: collective"))
    # rank 1 skips its first all-reduce, wherever the loop has it (the stop check before
    # the first step, today): the line names the file and line of that call
    assert re.match(r"error: collective all_reduce called from \w+\.py:\d+ ", line), line
    assert "timed out after 10 s (train.collective_timeout)" in line
