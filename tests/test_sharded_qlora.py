"""QLoRA under the backends that shard the weights, the 4-bit base stored in a float dtype
(`bnb_4bit_quant_storage`) so that they can flatten and shard it: DeepSpeed ZeRO-3 on its
CPU accelerator (one process), and FSDP2 on GPUs only (Accelerate never takes its FSDP
branch for a gloo CPU group). Each run trains, saves an adapter, and follows the loss curve
of a plain single-process QLoRA run."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_run_config, read_metrics, reset_accelerate
from test_sharded_backends import cpu_profile, run_launched

from launch.job import resolve_job
from trainer.cli import main

VOLATILE = ("elapsed_s", "tokens_per_s", "targets_per_s")
NO_DROPOUT = {"config_overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture
def qlora_run(tmp_path, tiny_models_by_task, data_dir):
    """A dropout-free tiny QLoRA classification run config and its plain 1-process run."""
    config = make_run_config(
        tmp_path,
        "classification",
        tiny_models_by_task,
        data_dir,
        model=NO_DROPOUT,
        peft={"method": "qlora", "r": 8, "dropout": 0.0},
        train={"max_steps": 4, "lr": 1e-2},
    )
    reference = tmp_path / "reference"
    reset_accelerate()
    assert main(["train", str(config), f"output_dir={reference}"]) == 0
    return config, reference


@pytest.mark.slow
def test_qlora_under_zero3_on_cpu_trains_and_follows_a_plain_run(qlora_run, tmp_path):
    config, reference = qlora_run
    profile = cpu_profile(tmp_path, "zero3", backend="deepspeed", zero_stage=3)
    job = resolve_job(str(config), str(profile), [])
    run_launched(job, 29427)
    summary = json.loads((job.run_dir / "run_summary.json").read_text())
    assert summary.get("distributed_type") == "DEEPSPEED"  # not a plain run in disguise
    assert (job.run_dir / "final" / "adapter_model.safetensors").is_file()
    assert losses(job.run_dir) == pytest.approx(losses(reference), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_qlora_under_fsdp2_on_gpu_trains_and_follows_a_plain_run(qlora_run, tmp_path):
    """Accelerate takes its FSDP branch only on GPUs (a gloo CPU group stays MULTI_CPU), so
    sharded QLoRA under FSDP2 is checked here, with every GPU of the machine."""
    config, reference = qlora_run
    gpus = torch.cuda.device_count()
    profile = tmp_path / "fsdp.yaml"
    profile.write_text(
        json.dumps(
            {"device": "gpu", "precision": "no", "backend": "fsdp", "processes_per_node": gpus}
        )
    )
    job = resolve_job(str(config), str(profile), [])
    run_launched(job, 29428)
    summary = json.loads((job.run_dir / "run_summary.json").read_text())
    assert summary["processes"] == gpus
    assert (job.run_dir / "final" / "adapter_model.safetensors").is_file()
    assert losses(job.run_dir) == pytest.approx(losses(reference), rel=1e-4)
