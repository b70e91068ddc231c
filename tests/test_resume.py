"""Checkpoints, exact resume and preemption: a run stopped by a signal, a time limit, a
crash while saving or a non-finite loss continues from its newest complete checkpoint and
ends exactly where an uninterrupted run ends (same logged numbers, bitwise-equal weights).

Most runs here are in-process (`trainer.cli.main`), with the signal sent to this very
process at a chosen optimizer step; the ones through `python -m trainer` (and torchrun) in
their own processes pay ~10-25 s of imports each and are marked slow."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import itertools
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, make_run_config, read_metrics, reset_accelerate
from safetensors.torch import load_file

import trainer.run.checkpoint
import trainer.run.train
import trainer.tasks.registry
from trainer.cli import main
from trainer.run.resume import (
    COMMIT_NAME,
    SAFE_TO_CHANGE,
    changed_keys,
    checkpoint_dir,
    problem_with,
    rotate,
    select_checkpoint,
    truncate_metrics,
    write_commit,
)
from trainer.run.step import Requests, optimizer_step
from trainer.run.stop import EXIT_PREEMPTED, slurm_job_to_requeue
from trainer.tasks.registry import TASKS

VOLATILE = ("elapsed_s", "tokens_per_s")  # wall-clock numbers: the only ones allowed to differ

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
STOP_AT = 5  # the step at which the interrupted runs save and leave (not a multiple of 3 or 7)


def cli(*argv) -> int:
    """`trainer ...` in this process, as a fresh process would see accelerate's state."""
    reset_accelerate()
    return main([str(a) for a in argv])


@pytest.fixture(autouse=True)
def _restore_signal_handlers():
    """Training installs SIGTERM/SIGUSR1 handlers in this process: put pytest's back."""
    saved = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for number, handler in saved.items():
        signal.signal(number, handler)


def comparable(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock numbers."""
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir)]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"tensors differ: {different}"


def final_weights(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "model.safetensors")


def checkpoint_weights(run_dir: Path, step: int) -> dict:
    return load_file(checkpoint_dir(run_dir, step) / "model.safetensors")


def loop_state(run_dir: Path, step: int) -> dict:
    return json.loads((checkpoint_dir(run_dir, step) / "trainer_state.json").read_text())["loop"]


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
    with pytest.MonkeyPatch.context() as patch:
        signal_at_step(patch, stop_at - 1, number)
        return cli("train", config, *overrides)


# --- exact resume, in this process ---------------------------------------------------------


@pytest.fixture(scope="module")
def exact_runs(tmp_path_factory, tiny_models_by_task, data_dir):
    """(the run dir of an uninterrupted run, the run dir and config of the same run for the
    test that interrupts and resumes it)."""
    ref, cut = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("cut")
    assert cli("train", make_run_config(ref, "mlm", tiny_models_by_task, data_dir, **EXACT)) == 0
    interrupted = make_run_config(cut, "mlm", tiny_models_by_task, data_dir, **EXACT)
    return ref / "run", cut / "run", interrupted


def test_setting_is_demanding(exact_runs):
    reference, _, _ = exact_runs
    summary = json.loads((reference / "run_summary.json").read_text())
    assert summary["accumulation_steps"] == 4
    assert summary["train_examples"] % summary["global_batch_size"] != 0
    assert STOP_AT % summary["steps_per_epoch"] > 0, "the stop should fall mid-epoch"
    assert summary["total_steps"] > STOP_AT + summary["steps_per_epoch"]
    model_config = json.loads((reference / "final" / "config.json").read_text())
    assert model_config["hidden_dropout_prob"] > 0


def test_sigterm_saves_and_exits_75_then_resume_is_exact(exact_runs, capfd):
    reference, cut, config = exact_runs
    assert stop_in_process(config, STOP_AT) == EXIT_PREEMPTED
    err = capfd.readouterr().err
    assert "stopped by SIGTERM at a saved checkpoint; run the same command to resume" in err
    assert saved_steps(cut)[-1] == STOP_AT
    assert loop_state(cut, STOP_AT)["step"] == STOP_AT
    assert not (cut / "final").exists()
    assert max(r["step"] for r in read_metrics(cut)) == STOP_AT

    assert cli("train", config) == 0
    err = capfd.readouterr().err
    assert f"resuming from {checkpoint_dir(cut, STOP_AT)} (step {STOP_AT})" in err
    assert comparable(cut) == comparable(reference)
    assert_same_tensors(final_weights(cut), final_weights(reference))
    assert json.loads((cut / "eval_results.json").read_text()) == json.loads(
        (reference / "eval_results.json").read_text()
    )


def test_restarting_a_finished_run_does_nothing(exact_runs, capfd):
    reference, _, _ = exact_runs
    before = (reference / "metrics.jsonl").read_bytes()
    assert cli("train", reference.parent / "mlm.yaml") == 0
    out, err = capfd.readouterr()
    assert "already finished" in out
    assert "resuming" not in err
    assert (reference / "metrics.jsonl").read_bytes() == before


# --- exact resume through `python -m trainer`, in their own processes -----------------------


def _env(**extra) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError, KeyError):  # a line being written
            steps.append(json.loads(line)["step"])
    return max(steps)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def run_and_signal(command, run_dir, at_step, number=signal.SIGTERM, env=None, target=None):
    """Start `command`, send `number` once metrics.jsonl shows a step >= at_step (to the
    process, or to the pids `target(process)` returns); returns the completed process."""
    process = subprocess.Popen(
        command, cwd=REPO, env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 400
    while process.poll() is None and time.monotonic() < deadline:
        if _logged_step(run_dir) >= at_step:
            for pid in target(process) if target else [process.pid]:
                os.kill(pid, number)
            break
        time.sleep(0.02)
    out, err = process.communicate(timeout=400)
    return subprocess.CompletedProcess(command, process.returncode, out.decode(), err.decode())


def trainer_command(config: Path, processes: int = 1) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "trainer", "train", str(config)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    return [*launcher, "--master_port", "29517", "-m", "trainer", "train", str(config)]


def _kill_and_resume(tmp_path, tiny_models_by_task, data_dir, processes, target=None):
    runs = {}
    for name in ("ref", "cut"):
        (tmp_path / name).mkdir()
        runs[name] = make_run_config(tmp_path / name, "mlm", tiny_models_by_task, data_dir, **EXACT)
    ref, cut = tmp_path / "ref" / "run", tmp_path / "cut" / "run"
    done = subprocess.run(
        trainer_command(runs["ref"], processes), cwd=REPO, env=_env(), capture_output=True
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
        trainer_command(runs["cut"], processes), cwd=REPO, env=_env(), capture_output=True
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
        tmp_path, tiny_models_by_task, data_dir, 2, target=lambda p: _children(p.pid)[1:]
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


# --- a crash while saving ------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["disk full", "crash"])
def test_failed_save_resumes_from_the_previous_checkpoint(
    run_config, tmp_path, monkeypatch, capfd, failure
):
    sections = {
        "data": {"validation": None},
        "train": {"max_steps": 6},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
    }
    reference = run_config("mlm", output_dir=str(tmp_path / "ref"), **sections)
    assert cli("train", reference) == 0
    config = run_config("mlm", **sections)
    run_dir = tmp_path / "run"
    real_commit = trainer.run.checkpoint.write_commit

    def commit_only_the_first(folder):
        if list((run_dir / "checkpoints").glob("step-*/" + COMMIT_NAME)):
            if failure == "disk full":
                raise OSError(errno.ENOSPC, "No space left on device")
            raise KeyboardInterrupt  # stands in for a kill in the middle of the save
        real_commit(folder)

    with monkeypatch.context() as patch:
        patch.setattr(trainer.run.checkpoint, "write_commit", commit_only_the_first)
        if failure == "disk full":
            assert cli("train", config) == 3
        else:
            with pytest.raises(KeyboardInterrupt):
                cli("train", config)
    err = capfd.readouterr().err
    partial = run_dir / "checkpoints" / "step-00000004.partial"
    if failure == "disk full":
        message = (
            f"error: could not write checkpoint {checkpoint_dir(run_dir, 4)}: "
            "No space left on device; the previous checkpoint is intact\n"
        )
        assert message in err and err.count("error:") == 1
    assert saved_steps(run_dir) == [2]
    assert partial.is_dir() and not (partial / COMMIT_NAME).exists()
    assert problem_with(partial) == "incomplete (no commit marker)"
    assert problem_with(checkpoint_dir(run_dir, 2)) is None
    assert not (run_dir / "final").exists()

    assert cli("train", config) == 0
    err = capfd.readouterr().err
    assert f"skipping checkpoint {partial}: incomplete (no commit marker)" in err
    assert f"resuming from {checkpoint_dir(run_dir, 2)} (step 2)" in err
    assert not partial.exists(), "the step-4 save should replace the partial folder"
    assert saved_steps(run_dir) == [4, 6]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert comparable(run_dir) == comparable(tmp_path / "ref")
    assert_same_tensors(final_weights(run_dir), final_weights(tmp_path / "ref"))


# --- rotation ------------------------------------------------------------------------------


def _fake_checkpoint(run_dir: Path, name: str, complete: bool = True) -> Path:
    folder = run_dir / "checkpoints" / name
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(name.encode())
    if complete:
        write_commit(folder)
    return folder


def test_rotate_keeps_the_newest_complete_and_the_best(tmp_path):
    folders = {s: _fake_checkpoint(tmp_path, f"step-{s:08d}") for s in (1, 2, 4, 5, 6)}
    unfinished = _fake_checkpoint(tmp_path, "step-00000003", complete=False)
    partial = _fake_checkpoint(tmp_path, "step-00000007.partial", complete=False)
    (tmp_path / "checkpoints" / "notes").mkdir()
    keep = {folders[2].resolve()}
    assert sorted(rotate(tmp_path, 2, keep)) == [folders[1], folders[4]]
    assert sorted(rotate(tmp_path, 2, set())) == [folders[1], folders[2], folders[4]]
    assert rotate(tmp_path, 0, set()) == [], "keep_last=0 keeps all"
    assert sorted(rotate(tmp_path, 10, set())) == []
    assert unfinished.exists() and partial.exists()
    # Committed but not yet renamed (a crash between the two): complete, and counted.
    committed = _fake_checkpoint(tmp_path, "step-00000008.partial")
    assert problem_with(committed) is None
    assert sorted(rotate(tmp_path, 2, keep)) == [folders[1], folders[4], folders[5]]


def test_rotation_in_a_run_keeps_the_last_two_and_the_best(run_config, tmp_path, on_cpu):
    # A learning rate this high makes the validation loss rise: the best step is early.
    config = run_config(
        "mlm",
        data={"validation": None, "validation_split": 0.1},
        train={"max_steps": 6, "lr": 0.3, "max_grad_norm": 0.0},
        eval={"every_steps": 1, "batch_size": 16},
        checkpoint={"every_steps": 1, "keep_last": 2},
    )
    assert cli("train", config) == 0
    run_dir = tmp_path / "run"
    best_step = json.loads((run_dir / "eval_results.json").read_text())["best_step"]
    assert best_step < 5, "the test needs the best evaluation before the last two steps"
    assert saved_steps(run_dir) == sorted({best_step, 5, 6})
    assert all(problem_with(checkpoint_dir(run_dir, s)) is None for s in saved_steps(run_dir))
    assert not list((run_dir / "checkpoints").glob("*.partial"))


# --- damaged checkpoints -------------------------------------------------------------------


@pytest.fixture
def stopped_run(run_config, tmp_path):
    """An MLM run with checkpoints at steps 2 and 4, stopped by SIGTERM after step 4."""
    config = run_config(
        "mlm", data={"validation": None}, train={"max_steps": 8}, checkpoint={"every_steps": 2}
    )
    assert stop_in_process(config, 4) == EXIT_PREEMPTED
    assert saved_steps(tmp_path / "run") == [2, 4]
    return config, tmp_path / "run"


def test_truncated_weights_are_detected_and_the_previous_checkpoint_used(stopped_run, capfd):
    config, run_dir = stopped_run
    weights = checkpoint_dir(run_dir, 4) / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as handle:
        handle.truncate(size // 2)
    problem = problem_with(checkpoint_dir(run_dir, 4))
    assert problem == f"model.safetensors has {size // 2} bytes, expected {size}"
    capfd.readouterr()
    assert cli("train", config) == 0
    err = capfd.readouterr().err
    assert f"skipping checkpoint {checkpoint_dir(run_dir, 4)}: {problem}" in err
    assert f"resuming from {checkpoint_dir(run_dir, 2)} (step 2)" in err
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_problem_with_names_the_damaged_file(stopped_run):
    _, run_dir = stopped_run
    folder = checkpoint_dir(run_dir, 4)
    assert problem_with(folder) is None
    optimizer = folder / "optimizer.bin"
    data = bytearray(optimizer.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    optimizer.write_bytes(bytes(data))
    assert problem_with(folder) == "optimizer.bin does not match its SHA-256"
    optimizer.unlink()
    assert problem_with(folder) == "optimizer.bin is missing"
    (folder / COMMIT_NAME).write_text("{not json")
    assert problem_with(folder) == "its commit marker is damaged"
    with pytest.raises(trainer.errors.UserError, match=r"checkpoint .*: its commit marker"):
        select_checkpoint(run_dir, str(folder), print)


def test_no_complete_checkpoint_left_refuses_to_start_over(stopped_run, capfd):
    config, run_dir = stopped_run
    for step in (2, 4):
        (checkpoint_dir(run_dir, step) / COMMIT_NAME).unlink()
    before = (run_dir / "metrics.jsonl").read_bytes()
    capfd.readouterr()
    assert cli("train", config) == 2
    err = capfd.readouterr().err
    assert "holds an unfinished run without a complete checkpoint" in err
    assert (run_dir / "metrics.jsonl").read_bytes() == before


# --- a changed run config ------------------------------------------------------------------


def test_resume_refuses_a_changed_learning_rate(stopped_run, capfd):
    config, run_dir = stopped_run
    before = (run_dir / "metrics.jsonl").read_bytes()
    capfd.readouterr()
    assert cli("train", config, "train.lr=0.002") == 2
    errors = capfd.readouterr().err.splitlines()
    assert errors == [
        "error: train.resume: the run config differs from checkpoint step-00000004 in "
        "train.lr; restore them or use another output_dir"
    ]
    assert (run_dir / "metrics.jsonl").read_bytes() == before
    assert not (run_dir / "final").exists()


def test_resume_accepts_a_changed_max_steps(stopped_run, capfd):
    config, run_dir = stopped_run
    capfd.readouterr()
    assert cli("train", config, "train.max_steps=6", "log.every_steps=2") == 0
    assert "(step 4)" in capfd.readouterr().err
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 6]
    assert json.loads((run_dir / "eval_results.json").read_text())["steps"] == 6


def test_changed_keys_ignores_only_the_safe_keys():
    saved = {"train": {"lr": 1e-3, "max_steps": 4, "seed": 0}, "model": {"config_overrides": {}}}
    current = {
        "train": {"lr": 2e-3, "max_steps": 8, "seed": 0},
        "model": {"config_overrides": {"hidden_dropout_prob": 0.0}},
        "output_dir": "elsewhere",
    }
    assert changed_keys(saved, current) == ["model.config_overrides", "train.lr"]
    assert "train.lr" not in SAFE_TO_CHANGE and "train.seed" not in SAFE_TO_CHANGE


def test_truncate_metrics_drops_the_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)))
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    truncate_metrics(tmp_path / "missing.jsonl", 4)  # nothing to cut


# --- non-finite losses ---------------------------------------------------------------------


def nan_loss_at(monkeypatch, steps: set[int], accumulation: int = 2) -> None:
    """Make the MLM loss NaN in every micro-batch of the given optimizer steps."""
    spec = TASKS["mlm"]
    calls = itertools.count()

    def loss(logits, labels, weight=None):
        loss_sum, count = spec.loss(logits, labels, weight)
        step = next(calls) // accumulation + 1
        return (loss_sum * float("nan") if step in steps else loss_sum), count

    patched = {**TASKS, "mlm": dataclasses.replace(spec, loss=loss)}
    monkeypatch.setattr(trainer.tasks.registry, "TASKS", patched)  # what task_spec looks up


def _optimizer_state(run_dir: Path, step: int):
    return torch.load(checkpoint_dir(run_dir, step) / "optimizer.bin", weights_only=True)


def test_nonfinite_step_is_skipped(run_config, tmp_path, monkeypatch):
    config = run_config(
        "mlm",
        data={"validation": None},
        train={"max_steps": 5},
        checkpoint={"every_steps": 1, "keep_last": 0},
    )
    nan_loss_at(monkeypatch, {3})
    assert cli("train", config) == 0
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert (results["steps"], results["skipped_steps"]) == (5, 1)
    assert [r["skipped_steps"] for r in read_metrics(run_dir)] == [0, 0, 1, 1, 1]
    assert all(
        json.dumps(r) == json.dumps(json.loads(json.dumps(r))) for r in read_metrics(run_dir)
    )
    # The skipped step changed neither the weights nor the optimizer nor the schedule.
    assert_same_tensors(checkpoint_weights(run_dir, 3), checkpoint_weights(run_dir, 2))
    before, after = _optimizer_state(run_dir, 2), _optimizer_state(run_dir, 3)
    for key, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(value, after["state"][key][name]), (key, name)
    scheduler = [
        torch.load(checkpoint_dir(run_dir, s) / "scheduler.pt", weights_only=True) for s in (2, 3)
    ]
    assert scheduler[0]["last_epoch"] == scheduler[1]["last_epoch"]
    assert loop_state(run_dir, 3)["nonfinite_in_a_row"] == 1
    assert loop_state(run_dir, 4)["nonfinite_in_a_row"] == 0
    assert not all(
        torch.equal(a, b)
        for a, b in zip(
            checkpoint_weights(run_dir, 4).values(),
            checkpoint_weights(run_dir, 3).values(),
            strict=True,
        )
    )


def test_nonfinite_with_stop_saves_and_exits_3(run_config, tmp_path, monkeypatch, capfd):
    config = run_config(
        "mlm",
        data={"validation": None},
        train={"max_steps": 5, "on_nonfinite": "stop"},
        checkpoint={"every_steps": 0},
    )
    with monkeypatch.context() as patch:
        nan_loss_at(patch, {3})
        assert cli("train", config) == 3
    err = capfd.readouterr().err
    message = (
        "error: non-finite loss or gradient norm at step 3 (1 in a row, "
        "train.on_nonfinite=stop); checkpoint saved\n"
    )
    assert message in err and err.count("error:") == 1
    run_dir = tmp_path / "run"
    assert saved_steps(run_dir) == [3]
    assert problem_with(checkpoint_dir(run_dir, 3)) is None
    assert loop_state(run_dir, 3)["skipped_steps"] == 1
    # Once the cause is gone, the same command continues after the bad step.
    assert cli("train", config) == 0
    assert "(step 3)" in capfd.readouterr().err
    assert json.loads((run_dir / "eval_results.json").read_text())["skipped_steps"] == 1


def test_too_many_nonfinite_steps_in_a_row_stop(run_config, tmp_path, monkeypatch, capfd):
    config = run_config(
        "mlm",
        data={"validation": None},
        train={"max_steps": 6, "max_nonfinite_in_a_row": 2},
    )
    nan_loss_at(monkeypatch, {2, 4, 5})
    assert cli("train", config) == 3
    assert "at step 5 (2 in a row, train.on_nonfinite=skip)" in capfd.readouterr().err
    assert loop_state(tmp_path / "run", 5)["skipped_steps"] == 3


def test_optimizer_step_skips_a_nan_loss(tiny_bert, bert_tokenizer):
    from transformers import AutoModelForMaskedLM

    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, bert_tokenizer.vocab_size, (4, 16), generator=generator)
    labels = torch.where(torch.rand(4, 16, generator=generator) < 0.3, ids, -100)
    window = [
        {
            "input_ids": ids[i : i + 2],
            "attention_mask": torch.ones_like(ids[i : i + 2]),
            "labels": labels[i : i + 2],
        }
        for i in (0, 2)
    ]

    calls = itertools.count()

    def nan_in_second(logits, labels, weight=None):
        loss_sum, count = TASKS["mlm"].loss(logits, labels, weight)
        return (loss_sum * float("nan") if next(calls) == 1 else loss_sum), count

    spec = dataclasses.replace(TASKS["mlm"], loss=nan_in_second)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = optimizer_step(
        model, window, spec, accelerator, optimizer, scheduler, 1.0, Requests(stop=True)
    )
    assert result.skipped
    assert result.requests == Requests(stop=True, save=False)
    assert all(torch.isfinite(t).all() for t in vars(result.sums).values())
    assert_same_tensors(model.state_dict(), before)
    assert scheduler.last_epoch == 0 and not optimizer.state
    assert all(p.grad is None for p in model.parameters())
    result = optimizer_step(model, window, TASKS["mlm"], accelerator, optimizer, scheduler, 1.0)
    assert not result.skipped and result.requests == Requests()
    assert scheduler.last_epoch == 1
    assert not torch.equal(
        model.state_dict()["bert.embeddings.word_embeddings.weight"],
        before["bert.embeddings.word_embeddings.weight"],
    )


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
        **_env(),
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


# --- train.max_time ------------------------------------------------------------------------


def test_max_time_saves_exits_75_and_resumes(run_config, tmp_path, capfd):
    config = run_config(
        "mlm",
        data={"validation": None},
        train={"max_steps": 100000, "max_time": "00:00:02"},
        log={"every_steps": 1, "trackers": []},
    )
    started = time.monotonic()
    assert cli("train", config) == EXIT_PREEMPTED
    assert time.monotonic() - started < 60
    err = capfd.readouterr().err
    assert "stopped by train.max_time at a saved checkpoint; run the same command to resume" in err
    run_dir = tmp_path / "run"
    stop = saved_steps(run_dir)[-1]
    assert 0 < stop < 100000
    assert max(r["step"] for r in read_metrics(run_dir)) == stop
    assert cli("train", config, f"train.max_steps={stop + 2}", "train.max_time=null") == 0
    assert f"(step {stop})" in capfd.readouterr().err
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, stop + 3))
    assert json.loads((run_dir / "eval_results.json").read_text())["steps"] == stop + 2
