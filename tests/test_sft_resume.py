"""Exact resume of sft runs: stopped by SIGTERM mid-epoch (and mid-accumulation) and resumed, a
run ends where the uninterrupted run ends (the same logged numbers, bitwise-equal weights),
packed and unpacked, with gradient accumulation and evaluations off the stop step."""

from __future__ import annotations

import itertools
import json
import os
import signal

import pytest
from interrupted_runs import (
    assert_same_tensors,
    cli,
    comparable,
    final_weights,
    saved_steps,
    stop_in_process,
)
from test_sft import reverse_rows, sft_config, write_jsonl

import trainer.run.step
from trainer.run.stop import EXIT_PREEMPTED

STOP_AT = 5  # not a multiple of the checkpoint (3) or evaluation (7) interval

# validation carved from train, global 8 = micro 2 x accumulation 4, a training set the
# global batch does not divide, LoRA-free full fine-tuning of the tiny Llama
EXACT = {
    "data.validation_split": 0.1,
    "train.epochs": 3,
    "train.micro_batch_size": 2,
    "train.lr": 3e-3,
    "eval.every_steps": 7,
    "eval.batch_size": 4,
    "checkpoint.every_steps": 3,
    "checkpoint.keep_last": 2,
}
# (rows, settings): packed, about 3 examples share a row
SHAPES = {
    "unpacked": (60, {"data.max_length": 48}),
    "packed": (180, {"data.packing": "true", "data.max_length": 128}),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_a_stopped_sft_run_resumes_exactly(tmp_path, tiny_llama_chat, shape, capfd):
    rows, packing = SHAPES[shape]
    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_rows(rows, 5, "messages"))
    settings = EXACT | packing
    reference = sft_config(tmp_path / "ref", tiny_llama_chat, train_file, **settings)
    assert cli("train", *reference) == 0
    ref_dir = tmp_path / "ref" / "run"
    summary = json.loads((ref_dir / "run_summary.json").read_text())
    assert summary["accumulation_steps"] == 4
    held_out = round(rows * EXACT["data.validation_split"])
    examples = (rows - held_out) // 2 if shape == "packed" else rows - held_out
    assert summary["train_examples"] <= examples  # packed: 2 or more examples a row
    assert summary["train_examples"] % 8 != 0
    assert STOP_AT % summary["steps_per_epoch"] > 0, "the stop should fall mid-epoch"
    assert summary["total_steps"] > STOP_AT + summary["steps_per_epoch"]

    interrupted = sft_config(tmp_path / "cut", tiny_llama_chat, train_file, **settings)
    assert stop_in_process(interrupted[0], STOP_AT, *interrupted[1:]) == EXIT_PREEMPTED
    cut_dir = tmp_path / "cut" / "run"
    assert saved_steps(cut_dir)[-1] == STOP_AT and not (cut_dir / "final").exists()
    capfd.readouterr()
    assert cli("train", *interrupted) == 0
    assert f"(step {STOP_AT})" in capfd.readouterr().err

    records = comparable(cut_dir)
    assert records == comparable(ref_dir)
    assert sum("loss" in r for r in records) == summary["total_steps"]
    assert any("eval_loss" in r for r in records)
    assert_same_tensors(final_weights(cut_dir), final_weights(ref_dir))
    assert json.loads((cut_dir / "eval_results.json").read_text()) == json.loads(
        (ref_dir / "eval_results.json").read_text()
    )


def test_a_signal_mid_accumulation_finishes_the_step_saves_and_resumes_exactly(
    tmp_path, tiny_llama_chat, monkeypatch, capfd
):
    """SIGTERM during the 2nd of the 4 micro-batches of step STOP_AT - 1: that window is
    completed (no half-accumulated gradient is saved or lost); the stop request travels with
    the next step's reductions, so every process stops after step STOP_AT, saves, and the
    resumed run is the uninterrupted one."""
    rows, packing = SHAPES["unpacked"]
    train_file = write_jsonl(tmp_path / "train.jsonl", reverse_rows(rows, 5, "messages"))
    settings = EXACT | packing | {"checkpoint.every_steps": 0}  # only the stop's checkpoint
    reference = sft_config(tmp_path / "ref", tiny_llama_chat, train_file, **settings)
    assert cli("train", *reference) == 0

    real, calls = trainer.run.step.forward, itertools.count(1)
    signalled_at = (STOP_AT - 2) * 4 + 2  # forward calls: 4 per step

    def forward_and_signal(*args, **kwargs):
        if next(calls) == signalled_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    interrupted = sft_config(tmp_path / "cut", tiny_llama_chat, train_file, **settings)
    with monkeypatch.context() as patch:
        patch.setattr(trainer.run.step, "forward", forward_and_signal)
        assert cli("train", *interrupted) == EXIT_PREEMPTED
    cut_dir, ref_dir = tmp_path / "cut" / "run", tmp_path / "ref" / "run"
    assert saved_steps(cut_dir) == [STOP_AT]
    assert max(r["step"] for r in comparable(cut_dir)) == STOP_AT
    capfd.readouterr()
    assert cli("train", *interrupted) == 0
    assert comparable(cut_dir) == comparable(ref_dir)
    assert_same_tensors(final_weights(cut_dir), final_weights(ref_dir))
