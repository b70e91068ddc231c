"""What `trainer train`, `trainer launch` and `trainer submit` refuse about the way a job is
started: users' launch files that contradict the run config, SLURM tasks without a
launcher, a profile with more GPUs than the machine, the deprecated NCCL variable; and the
exit codes that reach the caller."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, reset_accelerate

from launch.guard import check_train_environment
from launch.job import resolve_job, write_launch_files
from launch.local import children_exit_code
from trainer.cli import main
from trainer.config import load_config
from trainer.errors import UserError

BATCH = {"global_batch_size": 32, "micro_batch_size": 2}


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --- 7. under `accelerate launch --config_file theirs.yaml` -----------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4", "gives 16"),  # 32 / (2 x 1)
        ("ACCELERATE_MIXED_PRECISION", "bf16", "gives no (train.precision)"),
        ("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR", "gives NO (train.compile)"),
        ("ACCELERATE_GRADIENT_CLIPPING", "0.5", "gives 1.0 (train.max_grad_norm)"),
    ],
)
def test_train_refuses_accelerate_settings_that_contradict_the_run_config(
    run_config, monkeypatch, capsys, variable, value, named
):
    config = run_config("mlm", train=BATCH)
    monkeypatch.setenv(variable, value)
    assert cli("train", config) == 2
    line = error_line(capsys)
    assert f"{variable}={value}" in line and named in line
    assert not (config.parent / "run").exists(), "refused before anything started"


def test_train_accepts_accelerate_settings_that_agree(run_config, monkeypatch):
    cfg = load_config(run_config("mlm", train={**BATCH, "precision": "bf16"}))
    for variable, value in {
        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "16",
        "ACCELERATE_MIXED_PRECISION": "bf16",
        "ACCELERATE_DYNAMO_BACKEND": "NO",
        "ACCELERATE_GRADIENT_CLIPPING": "1",
    }.items():
        monkeypatch.setenv(variable, value)
    check_train_environment(cfg)


def deepspeed_json(tmp_path: Path, **settings) -> Path:
    base = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2},
    }
    path = tmp_path / "theirs.json"
    path.write_text(json.dumps({**base, **settings}))
    return path


def test_train_checks_the_deepspeed_json_accelerate_launch_passes(run_config, tmp_path):
    cfg = load_config(run_config("mlm", train=BATCH))
    environ = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_MIXED_PRECISION": "no"}
    environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(deepspeed_json(tmp_path))
    check_train_environment(cfg, environ)  # all "auto": filled from the run config
    environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(
        deepspeed_json(tmp_path, gradient_accumulation_steps=8, bf16={"enabled": True})
    )
    with pytest.raises(UserError) as refused:
        check_train_environment(cfg, environ)
    message = str(refused.value)
    assert "gradient_accumulation_steps is 8 but the run config gives 16" in message
    assert "bf16.enabled is True but the run config gives False (train.precision)" in message


# --- 7. a user's file in `trainer launch` / `trainer submit` ----------------------------------


def test_submit_fills_auto_in_the_users_deepspeed_json(run_config, tmp_path, capsys):
    config = run_config("mlm", train=BATCH)
    theirs = deepspeed_json(tmp_path, zero_optimization={"stage": 3, "overlap_comm": False})
    assert (
        cli("submit", config, "--cluster", "2node-16gpu-zero3", "--deepspeed", theirs, "--dry-run")
        == 0
    )
    written = json.loads((config.parent / "run" / "launch" / "deepspeed.json").read_text())
    assert written["train_batch_size"] == 32
    assert written["train_micro_batch_size_per_gpu"] == 2
    assert written["gradient_accumulation_steps"] == 1  # 32 / (2 x 16)
    assert written["gradient_clipping"] == 1.0
    assert written["bf16"]["enabled"] is True  # the profile's precision
    assert written["zero_optimization"] == {"stage": 3, "overlap_comm": False}  # theirs, kept


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"optimizer": {"type": "AdamW"}}, "remove its 'optimizer' block"),
        ({"scheduler": {"type": "WarmupLR"}}, "remove its 'scheduler' block"),
        ({"train_batch_size": 64}, "train_batch_size is 64 but the run config gives 32"),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage is 2 but the run config"),
    ],
)
def test_submit_refuses_a_deepspeed_json_that_contradicts_the_run(
    run_config, tmp_path, capsys, settings, expected
):
    config = run_config("mlm", train=BATCH)
    theirs = deepspeed_json(tmp_path, **settings)
    code = cli(
        "submit", config, "--cluster", "2node-16gpu-zero3", "--deepspeed", theirs, "--dry-run"
    )
    assert code == 2
    line = error_line(capsys)
    assert expected in line and str(theirs) in line
    assert not (config.parent / "run" / "launch").exists()


def test_launch_files_keep_the_users_accelerate_settings(run_config, tmp_path):
    config = run_config("mlm", train=BATCH)
    theirs = tmp_path / "theirs.yaml"
    theirs.write_text(
        yaml.safe_dump(
            {
                "distributed_type": "DEEPSPEED",
                "mixed_precision": "bf16",
                "num_processes": 8,
                "deepspeed_config": {"gradient_accumulation_steps": 2, "zero_stage": 2},
                "main_process_port": 29511,
            }
        )
    )
    job = resolve_job(str(config), "8gpu-zero2", [])
    job.user_accelerate = theirs
    accelerate_file, deepspeed_file = write_launch_files(job)
    written = yaml.safe_load(accelerate_file.read_text())
    assert written["main_process_port"] == 29511  # theirs
    assert written["deepspeed_config"]["deepspeed_config_file"] == str(deepspeed_file)
    assert "gradient_accumulation_steps" not in written["deepspeed_config"]  # in the JSON
    assert json.loads(deepspeed_file.read_text())["gradient_accumulation_steps"] == 2

    theirs.write_text(yaml.safe_dump({"deepspeed_config": {"gradient_accumulation_steps": 4}}))
    with pytest.raises(UserError, match=r"gradient_accumulation_steps is 4 but .* gives 2"):
        write_launch_files(job)
    theirs.write_text(yaml.safe_dump({"mixed_precision": "fp16"}))
    with pytest.raises(UserError, match=r"mixed_precision is fp16 but the run config gives bf16"):
        write_launch_files(job)


def test_the_deepspeed_json_an_accelerate_config_names_is_checked_too(run_config, tmp_path, capsys):
    config = run_config("mlm", train=BATCH)
    theirs = tmp_path / "theirs.yaml"
    named = deepspeed_json(tmp_path, optimizer={"type": "AdamW"})
    theirs.write_text(yaml.safe_dump({"deepspeed_config": {"deepspeed_config_file": str(named)}}))
    code = cli(
        "submit", config, "--cluster", "8gpu-zero2", "--accelerate-config", theirs, "--dry-run"
    )
    assert code == 2
    assert f"--deepspeed {named}: remove its 'optimizer' block" in error_line(capsys)
    theirs.write_text(yaml.safe_dump({"deepspeed_config": {"offload_optimizer_device": "cpu"}}))
    code = cli(
        "submit", config, "--cluster", "8gpu-zero2", "--accelerate-config", theirs, "--dry-run"
    )
    assert code == 2
    line = error_line(capsys)
    assert "offload_optimizer_device is cpu but the run config gives none" in line


def test_a_deepspeed_json_needs_a_deepspeed_profile(run_config, tmp_path, capsys):
    config = run_config("mlm", train=BATCH)
    code = cli("submit", config, "--cluster", "8gpu-ddp", "--deepspeed", deepspeed_json(tmp_path))
    assert code == 2
    assert "profile 8gpu-ddp runs backend ddp" in error_line(capsys)


# --- 8. wrong process layouts -----------------------------------------------------------------


def test_launch_refuses_a_profile_with_more_gpus_than_the_machine(run_config, monkeypatch, capsys):
    config = run_config("mlm", train=BATCH)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert cli("launch", config, "--cluster", "8gpu-ddp") == 2
    line = error_line(capsys)
    assert "8gpu-ddp starts 8 processes" in line and "this machine has 4 GPU(s)" in line
    assert not (config.parent / "run").exists(), "refused before launch"


@pytest.mark.parametrize(
    ("environ", "refused"),
    [
        ({"SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8"}, True),  # srun -n 8 python -m ..
        ({"SLURM_STEP_ID": "0", "SLURM_NTASKS": "8"}, True),
        ({"SLURM_NTASKS": "8"}, False),  # the batch script itself: one process
        ({"SLURM_STEP_NUM_TASKS": "2", "WORLD_SIZE": "16"}, False),  # one launcher per node
        ({"SLURM_STEP_NUM_TASKS": "1"}, False),
    ],
)
def test_train_refuses_slurm_tasks_without_a_launcher(run_config, environ, refused):
    cfg = load_config(run_config("mlm", train=BATCH))
    if not refused:
        check_train_environment(cfg, environ)
        return
    with pytest.raises(UserError, match=r"SLURM started 8 tasks .* without a launcher"):
        check_train_environment(cfg, environ)


def test_trainer_train_under_srun_without_a_launcher_exits_2(run_config, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli("train", run_config("mlm", train=BATCH)) == 2
    assert "without a launcher" in error_line(capsys)


TORCHRUN_REPORT = b"""Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : %d (pid: 12)
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : %d (pid: 11)
"""


@pytest.mark.parametrize(
    ("rank1", "rank0", "expected"),
    [
        (2, 2, 2),  # a user error on every rank
        (-15, 2, 2),  # rank 1 stopped by torchrun after rank 0 left with 2
        (-15, 3, 3),  # training failed
        (75, 75, 75),
        (-9, 75, 1),  # rank 1 OOM-killed: not a preemption
        (137, 75, 1),
        (2, 3, 1),  # different reasons: the launcher's own code
    ],
)
def test_exit_codes_2_3_75_pass_through_and_oom_is_no_preemption(rank1, rank0, expected):
    assert children_exit_code(1, TORCHRUN_REPORT % (rank1, rank0)) == expected


WORKER = """
import os, sys, time
code = int(os.environ["CODES"].split(",")[int(os.environ["RANK"])])
time.sleep(0.5 * int(os.environ["RANK"]))
sys.exit(code)
"""


@pytest.mark.slow
@pytest.mark.parametrize(("codes", "expected"), [("2,2", 2), ("3,3", 3), ("75,75", 75)])
def test_the_node_launcher_exits_with_the_training_processes_code(tmp_path, codes, expected):
    """Real torchrun under `python -m launch.node` (what `trainer launch` and the sbatch
    script run): torchrun itself exits with 1."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    command = [sys.executable, "-m", "launch.node", sys.executable, "-m", "torch.distributed.run"]
    command += ["--nproc_per_node", "2", "--master_port", "0", str(worker)]
    done = subprocess.run(command, env={**_env(), "CODES": codes}, capture_output=True)
    assert done.returncode == expected, done.stderr[-2000:]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


# --- 9. the deprecated NCCL variable ----------------------------------------------------------


def test_no_profile_or_template_sets_the_deprecated_nccl_variable():
    files = [*(REPO / "launch" / "clusters").glob("*.yaml"), *(REPO / "slurm").glob("*.sbatch")]
    deprecated = re.compile(r"(?<!TORCH_)NCCL_ASYNC_ERROR_HANDLING")
    assert not [f.name for f in files if deprecated.search(f.read_text())]
    for name in ("8gpu-ddp", "8gpu-zero2", "2node-16gpu-zero3"):
        env = yaml.safe_load((REPO / "launch" / "clusters" / f"{name}.yaml").read_text())["env"]
        assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"


def test_collective_timeout_is_a_validated_key(run_config, capsys):
    assert cli("train", run_config("mlm", train={**BATCH, "collective_timeout": 0})) == 2
    assert "train.collective_timeout: must be > 0, got 0" in error_line(capsys)


def accelerate_launch(theirs: Path, config: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file theirs.yaml -m trainer train CONFIG` (one process,
    DeepSpeed's CPU accelerator)."""
    from launch.local import free_port

    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(theirs)]
    command += ["--main_process_port", str(free_port()), "-m", "trainer", "train", str(config)]
    env = {**_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_accelerate_launch_with_the_users_own_deepspeed_files(run_config, tmp_path):
    """Their "auto" values are filled from the run config (Accelerate alone would fail on
    the micro batch, this loop passes no dataloader to prepare()); a value that contradicts
    the run config is refused by `trainer train` with one line."""
    train = {"max_steps": 2, "global_batch_size": 8, "micro_batch_size": 2, "max_grad_norm": 0.5}
    config = run_config("mlm", train=train, eval={"every_steps": 0}, log={"trackers": []})
    theirs = tmp_path / "theirs.yaml"
    settings = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "num_processes": 1,
        "num_machines": 1,
        "machine_rank": 0,
        "use_cpu": True,
        "deepspeed_config": {"deepspeed_config_file": str(deepspeed_json(tmp_path))},
    }
    theirs.write_text(yaml.safe_dump(settings))
    done = accelerate_launch(theirs, config)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (config.parent / "run" / "final").is_dir()

    wrong = deepspeed_json(tmp_path, gradient_accumulation_steps=2)
    settings["deepspeed_config"]["deepspeed_config_file"] = str(wrong)
    theirs.write_text(yaml.safe_dump(settings))
    done = accelerate_launch(theirs, config)
    assert done.returncode != 0
    assert (
        f"error: DeepSpeed JSON {wrong}: gradient_accumulation_steps is 2 but the run config "
        "gives 4 (train.global_batch_size / (train.micro_batch_size x 1 processes))"
    ) in done.stderr.splitlines(), done.stderr[-3000:]
