"""1 process vs 2 (cpu-2proc: torchrun over gloo) for sft: with the same global batch, the
same loss curve and the same final weights. Rows hold different numbers of answer tokens,
so the loss must be a mean over the answer tokens of the step on both processes, not a
mean of the processes' means. And DeepSpeed ZeRO-2/3 (its CPU accelerator) trains a packed
sft run as a plain run does."""

from __future__ import annotations

import json

import pytest
from interrupted_runs import cli
from test_launch import assert_same_training
from test_sft import reverse_rows, sft_config, write_jsonl

from launch.job import resolve_job

SETTINGS = {
    "train.max_steps": 4,
    "train.micro_batch_size": 2,  # global 8: accumulation 4 on 1 process, 2 on 2
    "train.lr": 3e-3,
    "eval.every_steps": 0,
}
SHAPES = {
    "unpacked": (48, {"data.max_length": 48}),
    "packed": (120, {"data.packing": "true", "data.max_length": 128}),
}


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
def test_two_processes_train_an_sft_run_like_one(tmp_path, tiny_llama_chat, shape, capfd):
    rows, packing = SHAPES[shape]
    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_rows(rows, 9, "messages"))
    one = sft_config(tmp_path / "one", tiny_llama_chat, train_file, **SETTINGS, **packing)
    assert cli("train", *one) == 0
    two = sft_config(tmp_path / "two", tiny_llama_chat, train_file, **SETTINGS, **packing)
    assert cli("launch", two[0], "--cluster", "cpu-2proc", *two[1:]) == 0, capfd.readouterr().err[
        -3000:
    ]
    summaries = [
        json.loads((tmp_path / name / "run" / "run_summary.json").read_text())
        for name in ("one", "two")
    ]
    assert [s["processes"] for s in summaries] == [1, 2]
    assert [s["accumulation_steps"] for s in summaries] == [4, 2]
    assert summaries[0]["train_examples"] == summaries[1]["train_examples"]
    # the gradient all-reduce sums in another order: 1e-6 held on Intel, not on AMD EPYC
    assert_same_training(tmp_path / "two" / "run", tmp_path / "one" / "run", atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_cpu_trains_a_packed_sft_run_like_a_plain_one(tmp_path, tiny_llama_chat, stage):
    """Started as `trainer launch` starts it, on one process (DeepSpeed's CPU accelerator
    starts no group of two here): the loss curve and final weights of the plain run, up to
    the rounding of ZeRO's flat partitions (ZeRO-3: 1.5e-6 measured on weights near 1
    after 4 Adam steps at lr 3e-3)."""
    from test_sharded_backends import cpu_profile, run_launched

    rows, packing = SHAPES["packed"]
    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_rows(rows, 9, "messages"))
    plain = sft_config(tmp_path / "plain", tiny_llama_chat, train_file, **SETTINGS, **packing)
    assert cli("train", *plain) == 0
    argv = sft_config(tmp_path / "zero", tiny_llama_chat, train_file, **SETTINGS, **packing)
    profile = cpu_profile(tmp_path, f"zero{stage}", backend="deepspeed", zero_stage=stage)
    job = resolve_job(argv[0], str(profile), argv[1:])
    run_launched(job, 29490 + stage)
    summary = json.loads((job.run_dir / "run_summary.json").read_text())
    assert summary["distributed_type"] == "DEEPSPEED"  # not a plain run under another name
    assert_same_training(job.run_dir, tmp_path / "plain" / "run", atol=1e-5)
