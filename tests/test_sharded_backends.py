"""Sharded backends on CPU, started the way `trainer launch` starts them: DeepSpeed ZeRO-2
and ZeRO-3 (DeepSpeed's CPU accelerator, one process) and FSDP (two processes, gloo). The
loss curve and the gathered final weights equal a plain single-process run's, and the
generated DeepSpeed JSON agrees with the run config."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_run_config, read_metrics, reset_accelerate
from safetensors.torch import load_file

from launch.accelerate_config import deepspeed_config
from launch.job import accelerate_command, resolve_job, write_launch_files
from trainer.cli import main

VOLATILE = ("elapsed_s", "tokens_per_s")
NO_DROPOUT = {"config_overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


def cpu_profile(folder: Path, name: str, **settings) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"device": "cpu", "precision": "no", **settings}))
    return path


def run_launched(job, port: int) -> None:
    config_file, _ = write_launch_files(job)
    command = accelerate_command(job, config_file, "0", "127.0.0.1", str(port))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_run(run_dir: Path, reference: Path, atol: float) -> None:
    if atol == 0.0:
        assert curve(run_dir) == curve(reference)
    else:  # two processes sum gradients in another order: equal up to float rounding
        assert curve(run_dir) == [pytest.approx(r, rel=1e-5) for r in curve(reference)]
    ours = load_file(run_dir / "final" / "model.safetensors")
    expected = load_file(reference / "final" / "model.safetensors")
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (ours[name] - tensor).abs().max().item() <= atol, name


@pytest.fixture
def mlm_run(tmp_path, tiny_models_by_task, data_dir) -> tuple[Path, Path]:
    """A dropout-free tiny MLM run config and its plain single-process run directory."""
    config = make_run_config(
        tmp_path, "mlm", tiny_models_by_task, data_dir, model=NO_DROPOUT, train={"max_steps": 4}
    )
    reference = tmp_path / "reference"
    reset_accelerate()
    assert main(["train", str(config), f"output_dir={reference}"]) == 0
    return config, reference


def curve(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_cpu_matches_a_plain_run(stage, mlm_run, tmp_path):
    config, reference = mlm_run
    profile = cpu_profile(tmp_path, f"zero{stage}", backend="deepspeed", zero_stage=stage)
    job = resolve_job(str(config), str(profile), [])
    settings = json.loads(json.dumps(deepspeed_config(job.cfg, job.profile, job.precision)))
    assert settings["zero_optimization"]["stage"] == stage
    assert settings["train_batch_size"] == job.cfg.train.global_batch_size == 8
    assert settings["train_micro_batch_size_per_gpu"] * settings["gradient_accumulation_steps"] == 8
    assert settings["gradient_clipping"] == job.cfg.train.max_grad_norm
    run_launched(job, 29400 + stage)
    assert json.loads((job.run_dir / "launch" / "deepspeed.json").read_text()) == settings
    assert_same_run(job.run_dir, reference, atol=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["FULL_SHARD", "SHARD_GRAD_OP"])
def test_fsdp_with_two_cpu_processes_matches_a_plain_run(mlm_run, tmp_path, strategy):
    """Also SHARD_GRAD_OP, which runs as FSDP2's reshard_after_forward false."""
    config, reference = mlm_run
    fsdp = {"sharding_strategy": strategy}
    profile = cpu_profile(tmp_path, "fsdp", backend="fsdp", processes_per_node=2, fsdp=fsdp)
    job = resolve_job(str(config), str(profile), [])
    run_launched(job, 29410 + (strategy == "SHARD_GRAD_OP"))
    summary = json.loads((job.run_dir / "run_summary.json").read_text())
    assert summary["processes"] == 2
    assert_same_run(job.run_dir, reference, atol=1e-6)
