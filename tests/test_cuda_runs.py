"""On one GPU (`make gpu-check`; skipped without CUDA): DeepSpeed ZeRO-2 and ZeRO-3 and
FSDP2, each in one process started the way `trainer launch` starts it, train like a plain
run on the same GPU; QLoRA trains with its 4-bit weights on the GPU. The CPU versions of the
same claims are in test_sharded_backends.py and test_adapters.py; here the backends take
their CUDA paths (NCCL, fused kernels, bitsandbytes' CUDA kernels)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_run_config, read_metrics, reset_accelerate
from safetensors.torch import load_file

from launch.job import accelerate_command, resolve_job, write_launch_files
from trainer.cli import main

pytestmark = pytest.mark.gpu

NO_DROPOUT = {"config_overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}
BACKENDS = {
    "zero2": {"backend": "deepspeed", "zero_stage": 2},
    "zero3": {"backend": "deepspeed", "zero_stage": 3},
    "fsdp2": {"backend": "fsdp"},
}


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_gpu_backend_matches_a_plain_run(backend, tmp_path, tiny_models_by_task, data_dir):
    config = make_run_config(
        tmp_path, "mlm", tiny_models_by_task, data_dir, model=NO_DROPOUT, train={"max_steps": 4}
    )
    reference = tmp_path / "reference"
    reset_accelerate()
    assert main(["train", str(config), f"output_dir={reference}"]) == 0
    profile = tmp_path / f"{backend}.yaml"
    settings = {"device": "gpu", "precision": "no", **BACKENDS[backend]}
    profile.write_text(yaml.safe_dump(settings))
    job = resolve_job(str(config), str(profile), [])
    config_file, _ = write_launch_files(job)
    command = accelerate_command(job, config_file, "0", "127.0.0.1", "29460")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # fp32 on one GPU: equal up to the order of floating-point sums in the backends' kernels
    assert losses(job.run_dir) == pytest.approx(losses(reference), rel=1e-4)
    ours = load_file(job.run_dir / "final" / "model.safetensors")
    expected = load_file(reference / "final" / "model.safetensors")
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (ours[name] - tensor).abs().max().item() <= 1e-4, name


def test_qlora_trains_with_4bit_weights_on_the_gpu(
    tmp_path, tiny_models_by_task, data_dir, monkeypatch
):
    import bitsandbytes as bnb

    config = make_run_config(
        tmp_path,
        "classification",
        tiny_models_by_task,
        data_dir,
        peft={"method": "qlora", "r": 16},
        train={"epochs": 3, "lr": 5e-3, "precision": "bf16"},
    )
    seen: list[torch.nn.Module] = []
    original = bnb.nn.Linear4bit.forward

    def watched(self, x):
        seen.append(self)
        return original(self, x)

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", watched)
    assert main(["train", str(config)]) == 0
    assert seen and all(m.weight.device.type == "cuda" for m in seen)
    assert all(m.weight.quant_state is not None for m in seen)
    curve = losses(tmp_path / "run")
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3
