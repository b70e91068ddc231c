"""Runs stopped on purpose and compared with uninterrupted ones: the helpers the resume,
stop, checkpoint, non-finite and requeue tests share (and the streaming and NSP tests).

Most runs are in-process (`trainer.cli.main`), with the signal sent to this very process at
a chosen optimizer step; the ones through `python -m trainer` (and torchrun) in their own
processes pay ~10-25 s of imports each, and the tests that start them are marked slow."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, reset_accelerate
from safetensors.torch import load_file

import trainer.run.train
from trainer.cli import main
from trainer.run.resume import checkpoint_dir

VOLATILE = (
    "elapsed_s",
    "tokens_per_s",
    "targets_per_s",
)  # wall-clock numbers: the only ones allowed to differ

# MLM with dropout on (the tiny BERT's default 0.1), validation carved from train, gradient
# accumulation (global 8 = micro 2 x 4 on one process, x 2 on two), a training set the
# global batch does not divide, and evaluations and checkpoints off the stop step.
EXACT = {
    "data": {"validation": None, "validation_split": 0.1},
    "train": {"epochs": 2, "global_batch_size": 8, "micro_batch_size": 2, "lr": 5e-3},
    "eval": {"every_steps": 7, "batch_size": 16},
    "checkpoint": {"every_steps": 3, "keep_last": 2},
    "log": {"every_steps": 1, "trackers": []},
}


# --- runs in this process -----------------------------------------------------------------


def cli(*argv) -> int:
    """`trainer ...` in this process, as a fresh process would see accelerate's state."""
    reset_accelerate()
    return main([str(a) for a in argv])


def comparable(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock numbers."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir)]


def assert_same_tensors(a: dict, b: dict) -> None:
    """Bitwise equal, key by key (the names of the differing ones in the failure)."""
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"tensors differ: {different}"


def final_weights(run_dir: Path) -> dict:
    """The weights in RUN_DIR/final."""
    return load_file(run_dir / "final" / "model.safetensors")


def loop_state(run_dir: Path, step: int) -> dict:
    """The loop's counters saved in the checkpoint of `step`."""
    return json.loads((checkpoint_dir(run_dir, step) / "loop_state.json").read_text())["loop"]


def saved_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in a run (folder names, oldest first)."""
    folders = (run_dir / "checkpoints").glob("step-*")
    return sorted(int(f.name.split("-")[1]) for f in folders if not f.name.endswith(".partial"))


def signal_at_step(monkeypatch, step: int, number: int = signal.SIGTERM) -> None:
    """Send `number` to this process during optimizer step `step`: the loop sees it at the
    next step boundary, so the run saves and stops after step `step + 1`."""
    real = trainer.run.train.optimizer_step
    calls = itertools.count(1)

    def step_and_signal(*args, **kwargs):
        if next(calls) == step:
            os.kill(os.getpid(), number)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer.run.train, "optimizer_step", step_and_signal)


def stop_in_process(config: Path, stop_at: int, *overrides, number=signal.SIGTERM) -> int:
    """`trainer train CONFIG` in this process, signalled so that it stops after `stop_at`."""
    with pytest.MonkeyPatch.context() as patch:
        signal_at_step(patch, stop_at - 1, number)
        return cli("train", config, *overrides)


# --- runs in their own processes ----------------------------------------------------------


def subprocess_env(**extra) -> dict:
    """This environment, offline and with one thread per process, plus `extra`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def logged_step(run_dir: Path) -> int:
    """The newest step in metrics.jsonl so far (0 before the first record)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError, KeyError):  # a line being written
            steps.append(json.loads(line)["step"])
    return max(steps)


def children(pid: int) -> list[int]:
    """The direct children of `pid` (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def run_and_signal(command, run_dir, at_step, number=signal.SIGTERM, env=None, target=None):
    """Start `command`, send `number` once metrics.jsonl shows a step >= at_step (to the
    process, or to the pids `target(process)` returns); returns the completed process."""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env=env or subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 400
    while process.poll() is None and time.monotonic() < deadline:
        if logged_step(run_dir) >= at_step:
            for pid in target(process) if target else [process.pid]:
                os.kill(pid, number)
            break
        time.sleep(0.02)
    out, err = process.communicate(timeout=400)
    return subprocess.CompletedProcess(command, process.returncode, out.decode(), err.decode())


def trainer_command(config: Path, processes: int = 1) -> list[str]:
    """`python -m trainer train CONFIG`, under torchrun for 2 processes."""
    if processes == 1:
        return [sys.executable, "-m", "trainer", "train", str(config)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return [*launcher, "--master_port", "29517", "-m", "trainer", "train", str(config)]
