"""launch.restarts: a requeued SLURM job takes a `train.resume=PATH` baked into its batch
script only on its first start (later starts continue from the run's newest checkpoint),
and a job that keeps starting at the same step without saving is refused."""

from __future__ import annotations

import json
import signal

import pytest
from interrupted_runs import cli, saved_steps, stop_in_process

from launch.restarts import MAX_STARTS_ENV, checked_start
from trainer.config import load_config
from trainer.errors import UserError
from trainer.run.resume import checkpoint_dir
from trainer.run.stop import EXIT_PREEMPTED


def slurm_start(monkeypatch, restarts: int, job: str = "4242") -> None:
    monkeypatch.setenv("SLURM_JOB_ID", job)
    monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
    for name in ("RANK", MAX_STARTS_ENV, "SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID"):
        monkeypatch.delenv(name, raising=False)


def test_pinned_resume_only_on_the_first_start(run_config, tmp_path, monkeypatch, capfd):
    """The script says train.resume=step-3 at every start: the first start resumes from
    it, the requeued one from the checkpoint the first start saved (step 5), not step 3."""
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 8})
    run_dir = tmp_path / "run"
    assert stop_in_process(config, 3) == EXIT_PREEMPTED
    pinned = f"train.resume={checkpoint_dir(run_dir, 3)}"
    capfd.readouterr()

    slurm_start(monkeypatch, 0)
    assert stop_in_process(config, 2, pinned, number=signal.SIGUSR1) == EXIT_PREEMPTED
    assert "(step 3)" in capfd.readouterr().err
    assert saved_steps(run_dir)[-1] == 5

    slurm_start(monkeypatch, 1)  # requeued: the same command line
    assert cli("train", config, pinned) == 0
    assert "(step 5)" in capfd.readouterr().err
    assert json.loads((run_dir / "eval_results.json").read_text())["steps"] == 8


def test_pinned_resume_is_kept_while_the_run_has_no_checkpoint(run_config, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere" / "step-7"  # e.g. another run's checkpoint
    cfg = load_config(run_config("mlm"), [f"train.resume={other}", "train.resume_trusted=true"])
    slurm_start(monkeypatch, 2)
    assert checked_start(cfg, {"SLURM_JOB_ID": "1", "SLURM_RESTART_COUNT": "2"}) == cfg


def test_outside_slurm_nothing_changes_or_is_written(run_config, tmp_path):
    cfg = load_config(run_config("mlm"), ["train.resume=/some/step-3", "train.resume_trusted=true"])
    assert checked_start(cfg, {"SLURM_RESTART_COUNT": "4"}) == cfg
    assert not (tmp_path / "run").exists()


def fake_checkpoint(run_dir, step: int) -> None:
    folder = checkpoint_dir(run_dir, step)
    folder.mkdir(parents=True)
    (folder / "COMMIT.json").write_text("{}")


def test_restarts_without_progress_are_capped(run_config, tmp_path):
    cfg = load_config(run_config("mlm"), [])
    run_dir = tmp_path / "run"
    fake_checkpoint(run_dir, 3)
    for restarts in range(3):  # the first start and two requeues, all from step 3
        checked_start(cfg, {"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": str(restarts)})
    starts = json.loads((run_dir / "logs" / "starts-9.json").read_text())
    assert starts == {"0": 3, "1": 3, "2": 3}
    with pytest.raises(UserError, match="SLURM job 9 restarted 3 times from step 3 without"):
        checked_start(cfg, {"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "3"})
    # a higher limit lets it start; progress (a later checkpoint) starts the count anew
    checked_start(cfg, {"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": "3", MAX_STARTS_ENV: "5"})
    fake_checkpoint(run_dir, 6)
    for restarts in range(4, 7):
        checked_start(cfg, {"SLURM_JOB_ID": "9", "SLURM_RESTART_COUNT": str(restarts)})
    # another job (a new submission) has its own count
    checked_start(cfg, {"SLURM_JOB_ID": "10", "SLURM_RESTART_COUNT": "0"})


def test_capped_restart_is_one_error_line(run_config, tmp_path, monkeypatch, capfd):
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 8})
    run_dir = tmp_path / "run"
    assert stop_in_process(config, 3) == EXIT_PREEMPTED
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "starts-4242.json").write_text('{"0": 3, "1": 3, "2": 3}')
    slurm_start(monkeypatch, 3)
    capfd.readouterr()
    assert cli("train", config) == 2
    err = capfd.readouterr().err
    assert err.startswith("error: SLURM job 4242 restarted 3 times from step 3 without saving")
    assert err.count("\n") == 1
    assert saved_steps(run_dir) == [3]


def test_bad_limit_is_one_error(run_config):
    cfg = load_config(run_config("mlm"), [])
    with pytest.raises(UserError, match=f"{MAX_STARTS_ENV}='-1': expected a positive integer"):
        checked_start(cfg, {"SLURM_JOB_ID": "9", MAX_STARTS_ENV: "-1"})
