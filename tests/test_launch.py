"""launch.local and `trainer launch`: two CPU processes (cpu-2proc, torchrun over gloo) train
the same run as one process, step for step; the Accelerate config and DeepSpeed JSON written
for a profile agree with the run config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_run_config, read_metrics, reset_accelerate
from safetensors.torch import load_file

from launch.job import resolve_job, write_launch_files
from launch.local import children_exit_code, node_command, profile_environment
from trainer.cli import main

# Dropout off, so that the only randomness left is the (process-count independent) masking.
PARITY = {
    "model": {
        "config_overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    },
    "train": {"max_steps": 5, "global_batch_size": 8, "micro_batch_size": 2, "lr": 5e-3},
    "eval": {"every_steps": 0},
    "log": {"every_steps": 1, "trackers": []},
}


def cli(*argv) -> int:
    reset_accelerate()
    return main([str(a) for a in argv])


def parity_config(folder: Path, models: dict, data_dir: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return make_run_config(folder, "mlm", models, data_dir, **PARITY)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir) if "loss" in r]


def assert_same_training(run: Path, reference: Path, atol: float = 1e-6) -> None:
    """Same loss curve (rel 1e-5) and the same final weights (to `atol`)."""
    got, expected = losses(run), losses(reference)
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, len(got) + 1))
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-5)
    ours, theirs = (load_file(r / "final" / "model.safetensors") for r in (run, reference))
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, tiny_models_by_task, data_dir) -> Path:
    """The parity run config trained by `trainer train` in this process."""
    config = parity_config(tmp_path_factory.mktemp("one"), tiny_models_by_task, data_dir)
    assert cli("train", config) == 0
    return config.parent / "run"


# --- two CPU processes equal one --------------------------------------------------------------


@pytest.mark.slow
def test_cpu_2proc_launch_trains_like_one_process(
    tmp_path, tiny_models_by_task, data_dir, one_process_run, capfd
):
    config = parity_config(tmp_path, tiny_models_by_task, data_dir)
    assert cli("launch", config, "--cluster", "cpu-2proc") == 0, capfd.readouterr().err[-3000:]
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["processes"] == 2
    assert_same_training(run_dir, one_process_run)
    assert (run_dir / "launch" / "accelerate_config.yaml").is_file()


def test_launch_refuses_a_multi_node_profile(run_config, capsys):
    config = run_config("mlm", train={"global_batch_size": 8, "micro_batch_size": 2})
    assert cli("launch", config, "--cluster", "2node-cpu-sim") == 2
    assert "use `trainer submit`" in capsys.readouterr().err


# --- the launcher's command and exit code -----------------------------------------------------


def test_cpu_profiles_start_torchrun_and_gpu_profiles_accelerate(run_config):
    config = run_config("mlm", train={"global_batch_size": 16, "micro_batch_size": 2})
    cpu = resolve_job(str(config), "cpu-2proc", [])
    command = node_command(cpu, Path("acc.yaml"), "0", "127.0.0.1", "29500")
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert command[command.index("--nproc_per_node") + 1] == "2"
    assert command[-3:] == ["trainer", "train", str(config.resolve())]
    gpu = resolve_job(str(config), "8gpu-ddp", ["data.max_length=16"])
    command = node_command(gpu, Path("acc.yaml"), "0", "127.0.0.1", "29500")
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[-4:] == [
        "train",
        str(config.resolve()),
        "data.max_length=16",
        "train.precision=bf16",
    ]


def test_deepspeed_on_cpu_starts_accelerate_on_deepspeeds_cpu_accelerator(run_config, tmp_path):
    """Under plain torchrun the processes would see no DeepSpeed config: DDP, silently."""
    config = run_config("mlm", train={"global_batch_size": 16, "micro_batch_size": 2})
    profile = tmp_path / "zero2-cpu.yaml"
    profile.write_text(yaml.safe_dump({"device": "cpu", "backend": "deepspeed", "zero_stage": 2}))
    job = resolve_job(str(config), str(profile), [])
    command = node_command(job, Path("acc.yaml"), "0", "127.0.0.1", "29500")
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert profile_environment(job)["DS_ACCELERATOR"] == "cpu"


def test_multi_node_deepspeed_starts_one_launcher_per_node(run_config):
    config = run_config("mlm", train={"global_batch_size": 32, "micro_batch_size": 2})
    job = resolve_job(str(config), "2node-16gpu-zero3", [])
    command = node_command(job, Path("acc.yaml"), "$SLURM_NODEID", "$MAIN_ADDR", "$MAIN_PORT")
    launcher = command.index("--deepspeed_multinode_launcher")
    assert command[launcher + 1] == "standard"
    assert launcher < command.index("trainer")


TORCHRUN_REPORT = b"""torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
Failures:
[1]:
  rank      : 1 (local_rank: 1)
  exitcode  : %d (pid: 12)
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 75 (pid: 11)
"""


@pytest.mark.parametrize(
    ("launcher_code", "stderr", "expected"),
    [
        (0, b"", 0),
        (1, TORCHRUN_REPORT % 75, 75),  # every rank saved and left: preempted
        (1, TORCHRUN_REPORT % -15, 75),  # rank 1 stopped by the launcher after rank 0 left
        (1, TORCHRUN_REPORT % 1, 1),  # a real failure on rank 1
        (1, b"Command '[...]' returned non-zero exit status 75.", 75),  # accelerate, 1 process
        (2, b"error: something else", 2),
    ],
)
def test_exit_code_of_the_training_processes(launcher_code, stderr, expected):
    assert children_exit_code(launcher_code, stderr) == expected


# --- Accelerate config and DeepSpeed JSON agree with the run config ---------------------------


@pytest.mark.parametrize(
    ("profile", "precision"), [("8gpu-zero2", "bf16"), ("8gpu-zero3-offload", "no")]
)
def test_deepspeed_json_agrees_with_the_run_config(run_config, profile, precision):
    config = run_config(
        "mlm", train={"global_batch_size": 64, "micro_batch_size": 2, "max_grad_norm": 0.5}
    )
    overrides = [] if precision == "bf16" else ["train.precision=no"]
    job = resolve_job(str(config), profile, overrides)
    accelerate_file, deepspeed_file = write_launch_files(job)
    assert accelerate_file.parent == deepspeed_file.parent == job.run_dir / "launch"
    settings = json.loads(deepspeed_file.read_text())
    assert settings["train_batch_size"] == 64
    assert settings["train_micro_batch_size_per_gpu"] == 2
    assert settings["gradient_accumulation_steps"] == 64 // (2 * 8)
    assert settings["gradient_clipping"] == 0.5
    assert settings["bf16"]["enabled"] is (precision == "bf16")
    assert settings["fp16"]["enabled"] is False
    accelerate = yaml.safe_load(accelerate_file.read_text())
    assert accelerate["distributed_type"] == "DEEPSPEED"
    assert accelerate["num_processes"] == 8
    # the precision lives in the DeepSpeed JSON; a second copy here must not contradict it
    assert accelerate.get("mixed_precision", precision) == precision
    assert accelerate["deepspeed_config"]["deepspeed_config_file"] == str(deepspeed_file)


def test_cpu_2proc_accelerate_config(run_config):
    config = run_config("mlm", train={"global_batch_size": 8, "micro_batch_size": 2})
    accelerate_file, deepspeed_file = write_launch_files(resolve_job(str(config), "cpu-2proc", []))
    assert deepspeed_file is None
    accelerate = yaml.safe_load(accelerate_file.read_text())
    assert accelerate["use_cpu"] is True
    assert accelerate["distributed_type"] == "MULTI_CPU"
    assert accelerate["num_processes"] == 2
