"""trainer.run.checkpoint: saves are atomic (a failed or killed save leaves the previous
checkpoint in charge) and rotation keeps the newest complete checkpoints and the best."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import read_metrics
from interrupted_runs import assert_same_tensors, cli, comparable, final_weights, saved_steps
from safetensors import safe_open

import trainer.run.checkpoint
from trainer.run.resume import (
    COMMIT_NAME,
    LOOP_STATE_NAME,
    checkpoint_dir,
    problem_with,
    rotate,
    write_commit,
)

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
        assert not partial.exists(), "a failed save removes its partial folder"
    else:
        assert partial.is_dir() and not (partial / COMMIT_NAME).exists()
        assert problem_with(partial) == "incomplete (no commit marker)"
    assert saved_steps(run_dir) == [2]
    assert problem_with(checkpoint_dir(run_dir, 2)) is None
    assert not (run_dir / "final").exists()

    assert cli("train", config) == 0
    err = capfd.readouterr().err
    skipped = f"skipping checkpoint {partial}: incomplete (no commit marker)"
    assert (skipped in err) == (failure == "crash")
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


# --- model/ of a checkpoint -----------------------------------------------------------------


def _tensors(path: Path) -> dict:
    with safe_open(path, "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


@pytest.mark.parametrize("task", ["classification", "clm"])  # BERT; GPT-2's tied lm_head
def test_a_full_runs_checkpoint_stores_its_weights_once_and_evaluates_as_final(
    run_config, tmp_path, capsys, task
):
    """model/ of a full run's checkpoint links Accelerate's weights (one inode, counted once
    by the manifest too), which carry save_pretrained's names: the best checkpoint scores
    exactly what final/, promoted from best/, scores."""
    config = run_config(
        task,
        train={"max_steps": 4},
        eval={"every_steps": 2, "batch_size": 16},
        checkpoint={"every_steps": 2, "keep_last": 3, "at_epoch_end": False},
    )
    assert cli("train", config) == 0
    run_dir = tmp_path / "run"
    best_step = json.loads((run_dir / "eval_results.json").read_text())["best_step"]
    folder = checkpoint_dir(run_dir, best_step)
    weights, linked = folder / "model.safetensors", folder / "model" / "model.safetensors"
    assert linked.stat().st_ino == weights.stat().st_ino and weights.stat().st_nlink == 2
    files = [p.stat() for p in folder.rglob("*") if p.is_file()]
    stored = {f.st_ino: f.st_size for f in files}  # what the disk holds: each inode once
    assert sum(stored.values()) == sum(f.st_size for f in files) - weights.stat().st_size
    final, saved = _tensors(run_dir / "final" / "model.safetensors"), _tensors(linked)
    assert saved.keys() == final.keys()
    assert all(torch.equal(saved[name], final[name]) for name in final)
    assert problem_with(folder) is None
    validation = yaml.safe_load(config.read_text())["data"]["validation"]
    capsys.readouterr()
    scores = []
    for model in (folder, run_dir / "final"):
        assert cli("evaluate", model, "--data", validation) == 0
        scores.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert scores[0] == scores[1]


@pytest.mark.parametrize(
    ("backend", "way_out"),
    [("deepspeed", "zero_to_fp32.py"), ("fsdp", "format_utils dcp_to_torch")],
)
def test_a_sharded_full_checkpoint_names_the_way_out(
    run_config, tmp_path, capsys, backend, way_out
):
    """A full model under ZeRO / FSDP is saved only in its shards (no model/): evaluate and
    export say so in one line and name the backend's tool that gathers them."""
    folder = checkpoint_dir(tmp_path / "run", 2)
    folder.mkdir(parents=True)
    state = {"loop": {"step": 2}, "config": {}, "processes": 2, "backend": backend}
    (folder / LOOP_STATE_NAME).write_text(json.dumps(state))
    validation = yaml.safe_load(run_config("classification").read_text())["data"]["validation"]
    capsys.readouterr()
    assert cli("evaluate", folder, "--data", validation) == 2
    assert cli("export", tmp_path / "run", "--checkpoint", "2", "--out", tmp_path / "x") == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in lines
    for key, line in zip(("MODEL_DIR", "RUN_DIR"), lines, strict=True):
        assert line.startswith(f"error: {key}: checkpoint {folder} has no model/: "), line
        assert way_out in line and "open final/ once the run ends" in line


def test_a_full_disk_while_linking_the_weights_stops_cleanly(run_config, tmp_path, capsys):
    """The write of model/ is covered like the rest of the checkpoint: refused (ENOSPC at the
    link of step 4), the run stops with exit 3, step-4.partial is gone, step 2 stays whole."""
    config = run_config(
        "classification",
        data={"validation": None},
        train={"max_steps": 6},
        checkpoint={"every_steps": 2, "at_epoch_end": False},
    )
    real_link = os.link

    def link(source, target):
        if "step-00000004" in str(source):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_link(source, target)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "link", link)
        assert cli("train", config) == 3
    run_dir = tmp_path / "run"
    err = capsys.readouterr().err
    assert f"could not write checkpoint {checkpoint_dir(run_dir, 4)}: No space left" in err
    assert saved_steps(run_dir) == [2] and problem_with(checkpoint_dir(run_dir, 2)) is None
    assert not list((run_dir / "checkpoints").glob("*.partial"))
