"""trainer.run.resume and exact resume: a run stopped mid-epoch continues from its newest
complete checkpoint and ends exactly where an uninterrupted run ends (same logged numbers,
bitwise-equal weights); a damaged checkpoint is skipped for the previous one; a changed run
config is refused except in the keys that are safe to change."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import make_run_config, read_metrics
from interrupted_runs import (
    EXACT,
    assert_same_tensors,
    cli,
    comparable,
    final_weights,
    loop_state,
    saved_steps,
    stop_in_process,
)

import trainer.errors
import trainer.run.train
from trainer.run.resume import (
    COMMIT_NAME,
    SAFE_TO_CHANGE,
    changed_keys,
    checkpoint_dir,
    problem_with,
    select_checkpoint,
    truncate_metrics,
)
from trainer.run.stop import EXIT_PREEMPTED

STOP_AT = 5  # the step at which the interrupted runs save and leave (not a multiple of 3 or 7)


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


# --- a checkpoint at each epoch's end ------------------------------------------------------

NO_STEP_CHECKPOINTS = {**EXACT, "checkpoint": {"every_steps": 0, "every_minutes": 0}}


def crash_at_step(monkeypatch, step: int) -> None:
    """A kill during optimizer step `step` (no checkpoint of its own, unlike a signal)."""
    real = trainer.run.train.optimizer_step
    calls = itertools.count(1)

    def step_or_crash(*args, **kwargs):
        if next(calls) == step:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer.run.train, "optimizer_step", step_or_crash)


def test_each_epoch_end_is_checkpointed_and_resumes_exactly(
    exact_runs, tmp_path, tiny_models_by_task, data_dir, capfd
):
    """No step checkpoints: a crash two steps into epoch 2 loses only those two steps."""
    reference, _, _ = exact_runs
    epoch = json.loads((reference / "run_summary.json").read_text())["steps_per_epoch"]
    config = make_run_config(tmp_path, "mlm", tiny_models_by_task, data_dir, **NO_STEP_CHECKPOINTS)
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        crash_at_step(patch, epoch + 3)
        cli("train", config)
    assert saved_steps(run_dir) == [epoch]
    state = loop_state(run_dir, epoch)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (epoch, 1, 0)
    capfd.readouterr()
    assert cli("train", config) == 0
    assert (
        f"resuming from {checkpoint_dir(run_dir, epoch)} (step {epoch})" in capfd.readouterr().err
    )
    assert saved_steps(run_dir) == [epoch], "no checkpoint at the last epoch's end"
    assert comparable(run_dir) == comparable(reference)
    assert_same_tensors(final_weights(run_dir), final_weights(reference))


def test_an_epoch_end_already_saved_by_its_step_is_not_saved_twice(
    run_config, tmp_path, monkeypatch
):
    sections = {"data": {"validation": None}, "train": {"epochs": 2}}
    probe = run_config("mlm", **sections, checkpoint={"at_epoch_end": False})
    assert cli("train", probe, "train.max_steps=1") == 0
    epoch = json.loads((tmp_path / "run" / "run_summary.json").read_text())["steps_per_epoch"]
    saved = []
    real = trainer.run.train.save_checkpoint
    monkeypatch.setattr(
        trainer.run.train,
        "save_checkpoint",
        lambda accelerator, folder, *rest: (
            saved.append(folder.name) or real(accelerator, folder, *rest)
        ),
    )
    config = run_config(
        "mlm", **sections, checkpoint={"every_steps": epoch}, output_dir=str(tmp_path / "twice")
    )
    assert cli("train", config) == 0
    assert saved == [f"step-{epoch:08d}", f"step-{2 * epoch:08d}"]


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
    # one file under two names: model/ links the checkpoint's weights (listed first)
    assert problem == f"model/model.safetensors has {size // 2} bytes, expected {size}"
    capfd.readouterr()
    assert cli("train", config) == 0
    err = capfd.readouterr().err
    assert f"skipping checkpoint {checkpoint_dir(run_dir, 4)}: {problem}" in err
    assert f"resuming from {checkpoint_dir(run_dir, 2)} (step 2)" in err
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))
    assert (run_dir / "final" / "model.safetensors").is_file()


def test_a_torn_last_metrics_line_is_cut_back_on_resume(stopped_run, capfd):
    """What a kill during an append leaves: half a record, no newline."""
    config, run_dir = stopped_run
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 5, "loss": 0.5')
    capfd.readouterr()
    assert cli("train", config) == 0
    assert "Traceback" not in capfd.readouterr().err
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))


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


def run_files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run, by path: what a refused start must leave as it was."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def test_resume_refuses_a_changed_learning_rate(stopped_run, capfd):
    config, run_dir = stopped_run
    before = run_files(run_dir)
    capfd.readouterr()
    assert cli("train", config, "train.lr=0.002") == 2
    errors = capfd.readouterr().err.splitlines()
    assert errors == [
        "error: train.resume: the run config differs from checkpoint step-00000004 in "
        "train.lr (saved 0.001, now 0.002); restore them or use another output_dir"
    ]
    assert run_files(run_dir) == before


def test_resume_refuses_a_max_steps_that_would_make_the_lr_jump(stopped_run, capfd):
    """The linear decay is stretched over train.max_steps: 8 -> 6 would move the LR of
    step 5 from 0.5x to 0.33x the peak at once."""
    config, run_dir = stopped_run
    before = run_files(run_dir)
    capfd.readouterr()
    assert cli("train", config, "train.max_steps=6", "log.every_steps=2") == 2
    assert capfd.readouterr().err.splitlines() == [
        "error: train.resume: the run config differs from checkpoint step-00000004 in "
        "train.max_steps (saved 8, now 6); restore them or use another output_dir (the "
        "learning-rate schedule is stretched over the steps they set)"
    ]
    assert run_files(run_dir) == before
    assert cli("train", config) == 0  # unchanged, it continues
    assert "(step 4)" in capfd.readouterr().err
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 9))


@pytest.mark.parametrize(
    ("saved", "now", "changed"),
    [
        ({"max_steps": 8}, {"max_steps": 6}, ["train.max_steps"]),
        ({"max_steps": 0, "epochs": 3}, {"max_steps": 0, "epochs": 4}, ["train.epochs"]),
        ({"max_steps": 0, "epochs": 3}, {"max_steps": 9, "epochs": 3}, ["train.max_steps"]),
        ({"max_steps": 8, "epochs": 3}, {"max_steps": 8, "epochs": 4}, []),  # epochs unused
        (
            {"max_steps": 8, "scheduler": "cosine"},
            {"max_steps": 9, "scheduler": "cosine"},
            ["train.max_steps"],
        ),
        (
            {"max_steps": 8, "scheduler": "constant", "warmup_ratio": 0.1},
            {"max_steps": 9, "scheduler": "constant", "warmup_ratio": 0.1},
            ["train.max_steps"],
        ),
        (
            {"max_steps": 8, "scheduler": "constant", "warmup_ratio": 0.0},
            {"max_steps": 9, "scheduler": "constant", "warmup_ratio": 0.0},
            [],
        ),
    ],
)
def test_the_length_of_the_run_may_change_only_where_the_lr_does_not_depend_on_it(
    saved, now, changed
):
    defaults = {"epochs": 3, "scheduler": "linear", "warmup_ratio": 0.1}
    assert changed_keys({"train": {**defaults, **saved}}, {"train": {**defaults, **now}}) == changed


def test_changed_keys_ignores_only_the_safe_keys():
    saved = {"train": {"lr": 1e-3, "max_steps": 4, "seed": 0}, "model": {"config_overrides": {}}}
    current = {
        "train": {"lr": 2e-3, "max_steps": 4, "seed": 0, "max_time": "10:00"},
        "model": {"config_overrides": {"hidden_dropout_prob": 0.0}},
        "output_dir": "elsewhere",
    }
    assert changed_keys(saved, current) == ["model.config_overrides", "train.lr"]
    assert "train.lr" not in SAFE_TO_CHANGE and "train.seed" not in SAFE_TO_CHANGE


def test_a_key_newer_than_the_saved_config_changes_nothing_at_its_default():
    """A run saved before `data.packing` existed resumes under a version that has it, while
    the key keeps its default (what the older version did); set otherwise, it is a change."""
    saved = {"data": {"max_length": 64}}
    assert changed_keys(saved, {"data": {"max_length": 64, "packing": False}}) == []
    assert changed_keys(saved, {"data": {"max_length": 64, "packing": True}}) == ["data.packing"]


def test_truncate_metrics_drops_the_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)))
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    truncate_metrics(tmp_path / "missing.jsonl", 4)  # nothing to cut
    with path.open("a") as handle:
        handle.write('{"step": 3, "lo')  # torn by a kill
    truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
