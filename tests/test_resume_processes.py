"""Resuming on another number of processes: a run checkpointed on 2 CPU processes (gloo DDP,
through `trainer launch`) continues on 1, and the reverse, with the losses and weights of
the uninterrupted run; the unlogged sums of every saving process are kept; and what cannot
continue the same run (another backend, ZeRO on another process count) is refused with one
line before the model loads. Streams: tests/test_stream.py."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType
from conftest import REPO, make_run_config, read_metrics
from interrupted_runs import cli, final_weights, saved_steps, stop_in_process, subprocess_env

from launch.job import accelerate_command, resolve_job, write_launch_files
from trainer.errors import UserError
from trainer.run.checkpoint import check_layout
from trainer.run.resume import LOOP_STATE_NAME, checkpoint_dir, write_commit
from trainer.run.step import StepSums
from trainer.run.stop import EXIT_PREEMPTED
from trainer.run.train import restored_sums

NO_DROPOUT = {
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "classifier_dropout": 0.0,
}
# Dropout off; the checkpoint at step 3 falls between two log lines, so its unlogged sums
# count in the record of step 4.
COMMON = {
    "model": {"config_overrides": NO_DROPOUT},
    "train": {"max_steps": 8, "global_batch_size": 8, "micro_batch_size": 2, "lr": 5e-3},
    "log": {"every_steps": 2, "trackers": []},
    "checkpoint": {"every_steps": 3, "keep_last": 5},
}
STOP_AT = 3


def data_settings(kind: str, data_dir: Path) -> tuple[str, dict]:
    """The task and data section: in-memory classification (the measured case), or MLM
    streamed from two weighted sources."""
    if kind == "memory":
        return "classification", {"validation": None}
    sources = [
        {"path": str(data_dir / "text.txt"), "weight": 3},
        {"path": str(data_dir / "text_validation.txt"), "weight": 1},
    ]
    return "mlm", {"train": sources, "validation": None, "streaming": True, "shuffle_buffer": 8}


def train_on(config: Path, processes: int, *overrides: str) -> None:
    """`trainer train` in this process, or `trainer launch --cluster cpu-2proc`."""
    if processes == 1:
        assert cli("train", config, *overrides) == 0
    else:
        assert cli("launch", config, "--cluster", "cpu-2proc", *overrides) == 0


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, tiny_models_by_task, data_dir) -> dict:
    """Make (and keep) the uninterrupted run of a data kind on a process count."""
    runs = {}

    def full_run(kind: str, processes: int) -> Path:
        if (kind, processes) not in runs:
            folder = tmp_path_factory.mktemp(f"{kind}{processes}")
            task, data = data_settings(kind, data_dir)
            config = make_run_config(
                folder, task, tiny_models_by_task, data_dir, data=data, **COMMON
            )
            train_on(config, processes)
            runs[kind, processes] = config
        return runs[kind, processes]

    return full_run


def stopped_copy(run_dir: Path, target: Path, step: int) -> Path:
    """`run_dir` as it was when it stopped after the checkpoint of `step`: its checkpoints
    up to there, and its log (resume cuts the records after the checkpoint)."""
    target.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", target / "metrics.jsonl")
    for kept in [s for s in saved_steps(run_dir) if s <= step]:
        shutil.copytree(checkpoint_dir(run_dir, kept), checkpoint_dir(target, kept))
    return target


def max_loss_difference(run: Path, reference: Path) -> float:
    """The largest difference of the logged losses after the checkpoint."""
    got = {r["step"]: r["loss"] for r in read_metrics(run)}
    expected = {r["step"]: r["loss"] for r in read_metrics(reference)}
    assert sorted(got) == sorted(expected) == [2, 4, 6, 8]
    return max(abs(got[s] - expected[s]) for s in got if s > STOP_AT)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["memory", "stream"])
@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2)])
def test_resume_on_another_process_count_continues_the_run(
    full_runs, tmp_path, kind, saved_on, resumed_on, capfd
):
    config = full_runs(kind, saved_on)
    reference = config.parent / "run"
    run_dir = stopped_copy(reference, tmp_path / "run", STOP_AT)
    train_on(config, resumed_on, f"output_dir={run_dir}")
    assert f"(step {STOP_AT})" in capfd.readouterr().err
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["processes"] == resumed_on
    difference = max_loss_difference(run_dir, reference)
    print(f"{kind} resumed {saved_on}->{resumed_on}: max loss difference {difference:.2e}")
    assert difference <= 1e-5
    theirs = final_weights(reference)
    for key, tensor in final_weights(run_dir).items():
        torch.testing.assert_close(tensor, theirs[key], atol=1e-6, rtol=0, msg=key)


# --- FSDP: torch.distributed.checkpoint reshards the model and optimizer --------------------
# Only on GPUs: Accelerate 1.15 turns FSDP on for multi-GPU-like devices, and a CPU run
# under an FSDP config trains as gloo DDP (distributed type MULTI_CPU), which the tests
# above cover. Two GPUs are needed for 2 -> 1 (NCCL refuses two ranks on one GPU).


def launched(config: Path, tmp_path: Path, processes: int, run_dir: Path, port: int) -> None:
    """The run under FSDP on `processes` GPUs, started as `trainer launch` starts it."""
    profile = tmp_path / f"fsdp{processes}.yaml"
    settings = {"device": "gpu", "precision": "no", "backend": "fsdp"}
    profile.write_text(yaml.safe_dump({**settings, "processes_per_node": processes}))
    job = resolve_job(str(config), str(profile), [f"output_dir={run_dir}"])
    config_file, _ = write_launch_files(job)
    command = accelerate_command(job, config_file, "0", "127.0.0.1", str(port))
    done = subprocess.run(
        command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2)])
def test_fsdp_resumes_on_another_process_count(
    tmp_path, tiny_models_by_task, data_dir, saved_on, resumed_on
):
    config = make_run_config(
        tmp_path, "mlm", tiny_models_by_task, data_dir, data={"validation": None}, **COMMON
    )
    reference = tmp_path / "reference"
    launched(config, tmp_path, saved_on, reference, 29430 + saved_on)
    saved = json.loads((checkpoint_dir(reference, STOP_AT) / LOOP_STATE_NAME).read_text())
    assert (saved["processes"], saved["backend"]) == (saved_on, "fsdp")
    assert (checkpoint_dir(reference, STOP_AT) / "pytorch_model_fsdp_0").is_dir()  # DCP shards
    assert not (checkpoint_dir(reference, STOP_AT) / "model").exists()  # not gathered to save
    run_dir = stopped_copy(reference, tmp_path / "run", STOP_AT)
    launched(config, tmp_path, resumed_on, run_dir, 29440 + resumed_on)
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["processes"] == resumed_on
    difference = max_loss_difference(run_dir, reference)
    print(f"fsdp resumed {saved_on}->{resumed_on}: max loss difference {difference:.2e}")
    assert difference <= 1e-5
    theirs = final_weights(reference)
    for key, tensor in final_weights(run_dir).items():
        torch.testing.assert_close(tensor, theirs[key], atol=1e-6, rtol=0, msg=key)


# --- the unlogged sums ----------------------------------------------------------------------


def fake_run(processes: int, rank: int) -> SimpleNamespace:
    accelerator = SimpleNamespace(
        num_processes=processes,
        process_index=rank,
        is_main_process=rank == 0,
        device=torch.device("cpu"),
    )
    return SimpleNamespace(accelerator=accelerator, spec=SimpleNamespace(extra_heads=[], logged=()))


def test_the_unlogged_sums_of_every_saving_process_are_kept():
    # [loss, targets, tokens, grad norm, positions] on each of 2 saving processes
    saved = [[2.0, 4.0, 10.0, 0.5, 12.0], [3.0, 4.0, 11.0, 0.5, 12.0]]
    alone = restored_sums(fake_run(1, 0), saved)
    assert alone.tolist() == [5.0, 8.0, 21.0, 0.5, 24.0]
    on_three = [restored_sums(fake_run(3, rank), saved).tolist() for rank in range(3)]
    summed = [sum(column) for column in zip(*on_three, strict=True)]
    assert summed[:3] + summed[4:] == [5.0, 8.0, 21.0, 24.0]
    assert [values[3] for values in on_three] == [0.5, 0.5, 0.5]  # the norm is not summed
    same = restored_sums(fake_run(2, 1), saved)
    assert same.tolist() == saved[1]
    assert isinstance(same, StepSums)


# --- refused: another backend; ZeRO or a stream on another process count ------------------------


def saved_checkpoint(folder: Path, processes: int, backend: str) -> Path:
    folder.mkdir()
    state = {"loop": {}, "config": {}, "processes": processes, "backend": backend}
    (folder / LOOP_STATE_NAME).write_text(json.dumps(state))
    return folder


def accelerator(kind: DistributedType, processes: int) -> SimpleNamespace:
    return SimpleNamespace(distributed_type=kind, num_processes=processes)


@pytest.mark.parametrize(
    ("saved", "now", "message"),
    [
        ((2, "ddp"), (DistributedType.FSDP, 2), "under ddp and this run uses fsdp"),
        ((2, "deepspeed"), (DistributedType.MULTI_CPU, 2), "under deepspeed and this run"),
        ((2, "deepspeed"), (DistributedType.DEEPSPEED, 1), "ZeRO state resumes only on 2"),
    ],
)
def test_check_layout_refuses(tmp_path, saved, now, message):
    folder = saved_checkpoint(tmp_path / "step-00000004", *saved)
    with pytest.raises(UserError, match=r"^train\.resume: checkpoint step-00000004 was saved"):
        check_layout(folder, accelerator(*now))
    with pytest.raises(UserError, match=re.escape(message)):
        check_layout(folder, accelerator(*now))


@pytest.mark.parametrize(
    ("saved", "now"),
    [
        ((2, "ddp"), (DistributedType.NO, 1)),
        ((1, "ddp"), (DistributedType.MULTI_GPU, 4)),
        ((2, "fsdp"), (DistributedType.FSDP, 1)),
        ((2, "deepspeed"), (DistributedType.DEEPSPEED, 2)),
    ],
)
def test_check_layout_accepts(tmp_path, saved, now):
    check_layout(saved_checkpoint(tmp_path / "step-1", *saved), accelerator(*now))


def test_a_change_of_backend_is_refused_in_one_line(run_config, tmp_path, capfd):
    config = run_config("mlm", data={"validation": None}, train={"max_steps": 6})
    assert stop_in_process(config, 2) == EXIT_PREEMPTED
    folder = checkpoint_dir(tmp_path / "run", 2)
    state = json.loads((folder / LOOP_STATE_NAME).read_text())
    assert (state["processes"], state["backend"]) == (1, "ddp")
    state["backend"] = "fsdp"  # as if an FSDP run had written it
    (folder / LOOP_STATE_NAME).write_text(json.dumps(state))
    (folder / "COMMIT.json").unlink()
    write_commit(folder)
    capfd.readouterr()
    assert cli("train", config) == 2
    assert capfd.readouterr().err.splitlines() == [
        "error: train.resume: checkpoint step-00000002 was saved under fsdp and this run "
        "uses ddp; resume it under fsdp (the cluster profile's backend)"
    ]
    assert not (tmp_path / "run" / "final").exists()
