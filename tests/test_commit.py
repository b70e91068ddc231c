"""What a kill, a node failure or a power loss can leave behind, and how the next start deals
with it: checkpoints by default, a run stopped before its first checkpoint, `best/` replaced
halfway, a finish halfway, and files durable before the older checkpoints are deleted."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import read_metrics
from interrupted_runs import cli, saved_steps, stop_in_process

import trainer.atomic
import trainer.run.resume
import trainer.run.setup
import trainer.run.train
from trainer.config import RunConfig, load_config
from trainer.run.checkpoint import _replace
from trainer.run.resume import COMMIT_NAME, checkpoint_dir, problem_with, write_commit
from trainer.run.setup import prepare_run_dir
from trainer.run.stop import EXIT_PREEMPTED

# --- checkpoints by default ----------------------------------------------------------------


def test_checkpoints_are_on_by_default_every_30_minutes(run_config, tmp_path, monkeypatch):
    assert RunConfig().checkpoint.every_minutes == 30
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 3})
    ticks = itertools.count(1)
    fake = SimpleNamespace(monotonic=lambda: time.monotonic() + 31 * 60 * next(ticks))
    monkeypatch.setattr(trainer.run.train, "time", fake)  # 31 minutes pass at every look
    assert cli("train", config) == 0
    assert saved_steps(tmp_path / "run") == [2, 3], "a save at every step, the last 2 kept"


def _killed_at_step(monkeypatch, step: int) -> None:
    """A SIGKILL stand-in after optimizer step `step`, before any checkpoint of it."""
    real = trainer.run.train.Loop.checkpoint_if_due

    def checkpoint_or_die(loop, requests):
        if loop.state.step == step:
            raise KeyboardInterrupt
        real(loop, requests)

    monkeypatch.setattr(trainer.run.train.Loop, "checkpoint_if_due", checkpoint_or_die)


def test_a_run_killed_before_its_first_checkpoint_starts_over(run_config, tmp_path, capfd):
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 4})
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        _killed_at_step(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            cli("train", config)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    capfd.readouterr()
    assert cli("train", config) == 0  # what SLURM's requeue after a node failure runs
    err = capfd.readouterr().err
    assert f"{run_dir} holds a run stopped before its first checkpoint: starting over" in err
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    (aside,) = run_dir.glob("metrics.jsonl.previous-*")
    assert [json.loads(line)["step"] for line in aside.read_text().splitlines()] == [1, 2, 3]
    assert (run_dir / "final" / "model.safetensors").is_file()


# --- best/ replaced halfway ----------------------------------------------------------------


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_text(text)
    return path


def test_a_stale_old_folder_does_not_block_the_next_replacement(tmp_path):
    """A kill after both renames of a replacement, before the old folder was deleted."""
    _folder(tmp_path / "best", "step 4")
    _folder(tmp_path / "best.old", "step 2")
    _replace(_folder(tmp_path / "best.tmp", "step 6"), tmp_path / "best")
    assert (tmp_path / "best" / "model.safetensors").read_text() == "step 6"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


@pytest.fixture
def finished_at_4(run_config, tmp_path):
    """An MLM run with validation, evaluated and checkpointed at steps 2 and 4, stopped by
    SIGTERM at its last step, 4, before finishing: the next start only finishes it."""
    config = run_config(
        "mlm",
        train={"max_steps": 4},
        eval={"every_steps": 2, "batch_size": 16},
        checkpoint={"every_steps": 2},
    )
    assert stop_in_process(config, 4) == EXIT_PREEMPTED
    run_dir = tmp_path / "run"
    assert (run_dir / "best").is_dir() and not (run_dir / "final").exists()
    return config, run_dir


def test_a_kill_between_the_renames_of_best_leaves_it_recoverable(finished_at_4, capfd):
    config, run_dir = finished_at_4
    weights = (run_dir / "best" / "model.safetensors").read_bytes()
    (run_dir / "best").rename(run_dir / "best.old")  # the first rename done, not the second
    capfd.readouterr()
    assert cli("train", config) == 0
    assert "Traceback" not in capfd.readouterr().err
    assert (run_dir / "final" / "model.safetensors").read_bytes() == weights
    assert not (run_dir / "best.old").exists()
    assert json.loads((run_dir / "eval_results.json").read_text())["steps"] == 4


# --- finishing is one commit ---------------------------------------------------------------


def _kill_at_results(monkeypatch, after_writing: bool) -> None:
    """A kill just before, or just after, eval_results.json is written."""
    real = trainer.atomic.write_json

    def write_or_die(path, value, indent=1):
        if path.name == "eval_results.json":
            if after_writing:
                real(path, value, indent)
            raise KeyboardInterrupt
        real(path, value, indent)

    monkeypatch.setattr(trainer.atomic, "write_json", write_or_die)


@pytest.mark.parametrize("after_writing", [False, True], ids=["before", "after"])
def test_a_kill_while_finishing_never_leaves_final_without_results(
    finished_at_4, capfd, after_writing
):
    config, run_dir = finished_at_4
    with pytest.MonkeyPatch.context() as patch:
        _kill_at_results(patch, after_writing)
        with pytest.raises(KeyboardInterrupt):
            cli("train", config)
    assert (run_dir / "eval_results.json").exists() == after_writing
    assert not (run_dir / "final").exists(), "final/ appears only after the results"
    capfd.readouterr()
    assert cli("train", config) == 0
    out, err = capfd.readouterr()
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert results["steps"] == 4 and results["best_step"] in (2, 4)
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert not (run_dir / "best").exists()
    if after_writing:  # the rename is all that was left: no resume, no training
        assert f"completed the interrupted finish of {run_dir}: best/ is final/" in err
        assert "already finished" in out and "resuming" not in err


def test_config_yaml_is_written_atomically(run_config, tmp_path, monkeypatch):
    written = []
    real = trainer.atomic.write_text

    def record(path, text):
        written.append(path.name)
        real(path, text)

    monkeypatch.setattr(trainer.atomic, "write_text", record)
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 1})
    assert cli("train", config) == 0
    assert "config.yaml" in written
    assert not list((tmp_path / "run").glob(".*.tmp"))


# --- durability ----------------------------------------------------------------------------


def test_checkpoint_files_are_durable_before_the_marker_and_older_ones_go(
    run_config, tmp_path, monkeypatch
):
    events: list[tuple[str, str]] = []
    real_fsync, real_rmtree = os.fsync, shutil.rmtree

    def fsync(handle):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{handle}")))
        real_fsync(handle)

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", str(path)))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    config = run_config(
        "mlm",
        data={"validation": None},
        train={"max_steps": 2},
        checkpoint={"every_steps": 1, "keep_last": 1},
    )
    assert cli("train", config) == 0
    run_dir = tmp_path / "run"
    second = checkpoint_dir(run_dir, 2)
    partial = str(second) + ".partial"
    tmp_marker = f"{partial}/.{COMMIT_NAME}."  # atomic.write_json's own tmp file
    marker = next(i for i, (_, path) in enumerate(events) if path.startswith(tmp_marker))
    files = json.loads((second / COMMIT_NAME).read_text())["files"]
    synced_before = {path for kind, path in events[:marker] if kind == "fsync"}
    assert {f"{partial}/{name}" for name in files} <= synced_before
    assert ("fsync", partial) in events[:marker]
    rotated = ("rmtree", str(checkpoint_dir(run_dir, 1)))
    deleted = len(events) - 1 - events[::-1].index(rotated)  # its last: the save clears it too
    assert marker < deleted
    assert ("fsync", str(run_dir / "checkpoints")) in events[marker:deleted], "the rename"
    assert saved_steps(run_dir) == [2]


# --- integrity at a small cost -------------------------------------------------------------


def test_pieces_of_a_file_are_hashed_and_checked_each(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer.run.resume, "HASH_PIECE", 1000)
    folder = tmp_path / "step-00000001"
    folder.mkdir()
    (folder / "optimizer.bin").write_bytes(os.urandom(2500))
    (folder / "empty.json").write_bytes(b"")
    write_commit(folder)
    entries = json.loads((folder / COMMIT_NAME).read_text())["files"]
    assert [len(entries[name]["sha256"]) for name in ("empty.json", "optimizer.bin")] == [1, 3]
    assert problem_with(folder) is None
    data = bytearray((folder / "optimizer.bin").read_bytes())
    data[2400] ^= 0xFF  # in the last piece
    (folder / "optimizer.bin").write_bytes(bytes(data))
    assert problem_with(folder) == "optimizer.bin does not match its SHA-256"
    # a manifest of whole-file digests, as checkpoints written before the pieces have
    whole = {"size": 2500, "sha256": hashlib.sha256(bytes(data)).hexdigest()}
    empty = {"size": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    (folder / COMMIT_NAME).write_text(
        json.dumps({"files": {"optimizer.bin": whole, "empty.json": empty}})
    )
    assert problem_with(folder) is None


def test_only_the_main_process_reads_the_checkpoint_hashes(stopped_at_2, monkeypatch):
    """The other processes take the main one's choice instead of hashing it all again."""
    config, run_dir = stopped_at_2
    chosen = checkpoint_dir(run_dir, 2)

    def no_hashing(folder):
        raise AssertionError("a process other than the main one hashed the checkpoint")

    monkeypatch.setattr(trainer.run.resume, "problem_with", no_hashing)
    monkeypatch.setattr(
        trainer.run.setup, "broadcast_object_list", lambda box: box.__setitem__(0, chosen)
    )
    other = SimpleNamespace(is_main_process=False, num_processes=2)
    assert prepare_run_dir(load_config(config, []), other) == (run_dir, chosen)


@pytest.fixture
def stopped_at_2(run_config, tmp_path):
    config = run_config(
        "mlm", data={"validation": None}, train={"max_steps": 4}, checkpoint={"every_steps": 2}
    )
    assert stop_in_process(config, 2) == EXIT_PREEMPTED
    return config, tmp_path / "run"
