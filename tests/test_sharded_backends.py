"""Sharded backends on CPU, started the way `trainer launch` starts them: DeepSpeed ZeRO-2
and ZeRO-3 (DeepSpeed's CPU accelerator, one process) log the loss curve and save the
gathered final weights of a plain single-process run, also when a step is skipped as
non-finite, and the generated DeepSpeed JSON agrees with the run config. The ZeRO runs
check in run_summary.json that Accelerate really ran DeepSpeed: on a CPU machine they once
ran as plain runs. FSDP, which Accelerate runs only on GPUs, is refused on CPU (its GPU
runs are in test_cuda_runs.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, make_run_config, read_metrics, reset_accelerate
from interrupted_runs import assert_same_tensors
from nonfinite_launch import nan_loss_in
from transformers import AutoModelForMaskedLM

import trainer.tasks.registry
from launch.accelerate_config import deepspeed_config
from launch.job import resolve_job, write_launch_files
from launch.local import node_command, profile_environment
from trainer.cli import main
from trainer.run.resume import checkpoint_dir

VOLATILE = ("elapsed_s", "tokens_per_s", "targets_per_s")
NO_DROPOUT = {"config_overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


def cpu_profile(folder: Path, name: str, **settings) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"device": "cpu", "precision": "no", **settings}))
    return path


def run_launched(job, port: int, module: str = "trainer", **env: str) -> None:
    """The command and environment `trainer launch` runs (for DeepSpeed on CPU: `accelerate
    launch` on DeepSpeed's CPU accelerator), of `python -m module` (a test's wrapper of
    `trainer`, started from tests/, or trainer itself)."""
    config_file, _ = write_launch_files(job)
    command = node_command(job, config_file, "0", "127.0.0.1", str(port))
    command[command.index("trainer")] = module
    env |= {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env = {**profile_environment(job), **env, "PYTHONPATH": str(Path(__file__).parent)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_same_run(run_dir: Path, reference: Path, atol: float) -> None:
    if atol == 0.0:
        assert curve(run_dir) == curve(reference)
    else:  # two processes, or ZeRO's flat partitions, sum in another order: float rounding
        assert curve(run_dir) == [
            {k: pytest.approx(v, rel=1e-5) if isinstance(v, float) else v for k, v in r.items()}
            for r in curve(reference)
        ]
    # As loaded, not as stored: DeepSpeed's gathered state dict also holds the tied decoder
    # weights (ZeRO-2) and comes out of save_pretrained with BERT's legacy LayerNorm names
    # (ZeRO-3); from_pretrained reads both into the same model.
    ours = AutoModelForMaskedLM.from_pretrained(run_dir / "final").state_dict()
    expected = AutoModelForMaskedLM.from_pretrained(reference / "final").state_dict()
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
    summary = json.loads((job.run_dir / "run_summary.json").read_text())
    assert summary["distributed_type"] == "DEEPSPEED"  # not a plain run under another name
    assert_same_run(job.run_dir, reference, atol=1e-6)


def test_fsdp_on_cpu_is_refused_rather_than_run_as_ddp(mlm_run, tmp_path, capsys):
    """Accelerate runs FSDP only on GPUs: a CPU FSDP profile once trained as DDP under the
    name FSDP (run_summary.json said MULTI_CPU). FSDP2 runs are tested on a GPU
    (test_cuda_runs.py, test_resume_processes.py), with `make gpu-check`."""
    config, _ = mlm_run
    profile = cpu_profile(tmp_path, "fsdp", backend="fsdp", processes_per_node=2)
    assert main(["launch", str(config), "--cluster", str(profile)]) == 2
    assert "backend: fsdp needs device gpu" in capsys.readouterr().err


def zero_weights(run_dir: Path, step: int) -> dict:
    """The fp32 weights in a DeepSpeed checkpoint, gathered from its ZeRO partitions."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = checkpoint_dir(run_dir, step)
    return get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="pytorch_model")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_skips_a_nonfinite_step_as_a_plain_run_does(
    stage, tmp_path, tiny_models_by_task, data_dir, monkeypatch
):
    """The engine steps inside Accelerate's backward; the shared decision must come first.
    The NaN loss has finite gradients, so DeepSpeed's own overflow check would let it pass."""
    config = make_run_config(
        tmp_path,
        "mlm",
        tiny_models_by_task,
        data_dir,
        model=NO_DROPOUT,
        data={"validation": None},
        train={"max_steps": 4},
        checkpoint={"every_steps": 1, "keep_last": 0},
    )
    reference = tmp_path / "reference"
    monkeypatch.setattr(trainer.tasks.registry, "TASKS", nan_loss_in({2}, finite_gradients=True))
    assert main(["train", str(config), f"output_dir={reference}"]) == 0
    profile = cpu_profile(tmp_path, f"zero{stage}", backend="deepspeed", zero_stage=stage)
    job = resolve_job(str(config), str(profile), [])
    run_launched(job, 29420 + stage, "nonfinite_launch", NAN_STEPS="2", NAN_GRADIENTS="finite")
    summary = json.loads((job.run_dir / "run_summary.json").read_text())
    assert summary["distributed_type"] == "DEEPSPEED"
    assert [r["skipped_steps"] for r in read_metrics(job.run_dir)] == [0, 1, 1, 1]
    # The same losses, learning rates and final weights as the plain run that skipped step 2.
    assert_same_run(job.run_dir, reference, atol=1e-6)
    before, skipped, after = (zero_weights(job.run_dir, step) for step in (1, 2, 3))
    assert_same_tensors(skipped, before)
    assert any(not torch.equal(after[name], t) for name, t in skipped.items())
