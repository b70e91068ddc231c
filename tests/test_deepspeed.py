"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (DeepSpeed's CPU accelerator), one process, started
the way `trainer launch` starts them: the loss curve and the gathered final weights equal a
plain single-process run's, and the generated DeepSpeed JSON agrees with the run config."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_run_config, read_metrics, reset_accelerate
from safetensors.torch import load_file

from launch.job import accelerate_command, resolve_job, write_launch_files
from trainer.cli import main

VOLATILE = ("elapsed_s", "tokens_per_s")
NO_DROPOUT = {"config_overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


def cpu_deepspeed_profile(folder: Path, stage: int) -> Path:
    path = folder / f"cpu-zero{stage}.yaml"
    profile = {"device": "cpu", "backend": "deepspeed", "zero_stage": stage, "precision": "no"}
    path.write_text(yaml.safe_dump(profile))
    return path


def curve(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_cpu_matches_a_plain_run(stage, tmp_path, tiny_models_by_task, data_dir):
    config = make_run_config(
        tmp_path, "mlm", tiny_models_by_task, data_dir, model=NO_DROPOUT, train={"max_steps": 4}
    )
    reference = tmp_path / "reference"
    reset_accelerate()
    assert main(["train", str(config), f"output_dir={reference}"]) == 0

    job = resolve_job(str(config), str(cpu_deepspeed_profile(tmp_path, stage)), [])
    config_file, deepspeed_file = write_launch_files(job)
    settings = json.loads(deepspeed_file.read_text())
    assert settings["zero_optimization"]["stage"] == stage
    assert settings["train_batch_size"] == job.cfg.train.global_batch_size == 8
    assert settings["train_micro_batch_size_per_gpu"] * settings["gradient_accumulation_steps"] == 8
    assert settings["gradient_clipping"] == job.cfg.train.max_grad_norm

    command = accelerate_command(job, config_file, "0", "127.0.0.1", str(29400 + stage))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = job.run_dir
    assert curve(run_dir) == curve(reference)
    ours = load_file(run_dir / "final" / "model.safetensors")
    expected = load_file(reference / "final" / "model.safetensors")
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (ours[name] - tensor).abs().max().item() <= 1e-6, name
