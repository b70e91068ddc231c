"""Non-finite losses: a NaN step is skipped on every process (weights, optimizer and
schedule untouched), or stops the run with a checkpoint (exit 3), and too many in a row
stop it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, read_metrics
from interrupted_runs import (
    assert_same_tensors,
    cli,
    final_weights,
    loop_state,
    saved_steps,
    subprocess_env,
)
from nonfinite_launch import nan_loss_in
from safetensors.torch import load_file

import trainer.run.train
import trainer.tasks.registry
from launch.local import free_port
from trainer.run.resume import checkpoint_dir, is_fault_checkpoint, problem_with
from trainer.run.step import Requests, optimizer_step
from trainer.tasks.registry import TASKS


def nan_loss_at(monkeypatch, steps: set[int], accumulation: int = 2) -> None:
    """Make the MLM loss NaN in every micro-batch of the given optimizer steps."""
    monkeypatch.setattr(trainer.tasks.registry, "TASKS", nan_loss_in(steps, accumulation))


def checkpoint_weights(run_dir: Path, step: int) -> dict:
    return load_file(checkpoint_dir(run_dir, step) / "model.safetensors")


def _optimizer_state(run_dir: Path, step: int):
    return torch.load(checkpoint_dir(run_dir, step) / "optimizer.bin", weights_only=True)


def test_nonfinite_step_is_skipped(run_config, tmp_path, monkeypatch):
    config = run_config(
        "mlm",
        data={"validation": None},
        train={"max_steps": 5},
        checkpoint={"every_steps": 1, "keep_last": 0},
    )
    nan_loss_at(monkeypatch, {3})
    assert cli("train", config) == 0
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "eval_results.json").read_text())
    assert (results["steps"], results["skipped_steps"]) == (5, 1)
    assert [r["skipped_steps"] for r in read_metrics(run_dir)] == [0, 0, 1, 1, 1]
    assert all(
        json.dumps(r) == json.dumps(json.loads(json.dumps(r))) for r in read_metrics(run_dir)
    )
    # The skipped step changed neither the weights nor the optimizer nor the schedule.
    assert_same_tensors(checkpoint_weights(run_dir, 3), checkpoint_weights(run_dir, 2))
    before, after = _optimizer_state(run_dir, 2), _optimizer_state(run_dir, 3)
    for key, state in before["state"].items():
        for name, value in state.items():
            assert torch.equal(value, after["state"][key][name]), (key, name)
    scheduler = [
        torch.load(checkpoint_dir(run_dir, s) / "scheduler.pt", weights_only=True) for s in (2, 3)
    ]
    assert scheduler[0]["last_epoch"] == scheduler[1]["last_epoch"]
    assert loop_state(run_dir, 3)["nonfinite_in_a_row"] == 1
    assert loop_state(run_dir, 4)["nonfinite_in_a_row"] == 0
    assert not all(
        torch.equal(a, b)
        for a, b in zip(
            checkpoint_weights(run_dir, 4).values(),
            checkpoint_weights(run_dir, 3).values(),
            strict=True,
        )
    )


def test_nonfinite_with_stop_saves_and_exits_3(run_config, tmp_path, monkeypatch, capfd):
    config = run_config(
        "mlm",
        data={"validation": None},
        train={"max_steps": 5, "on_nonfinite": "stop"},
        checkpoint={"every_steps": 0},
    )
    with monkeypatch.context() as patch:
        nan_loss_at(patch, {3})
        assert cli("train", config) == 3
    err = capfd.readouterr().err
    message = (
        "error: non-finite loss or gradient norm at step 3 (1 in a row, "
        "train.on_nonfinite=stop); checkpoint saved\n"
    )
    assert message in err and err.count("error:") == 1
    run_dir = tmp_path / "run"
    assert saved_steps(run_dir) == [3]
    assert problem_with(checkpoint_dir(run_dir, 3)) is None
    assert loop_state(run_dir, 3)["skipped_steps"] == 1
    # Once the cause is gone, the same command continues after the bad step.
    assert cli("train", config) == 0
    assert "(step 3)" in capfd.readouterr().err
    assert json.loads((run_dir / "eval_results.json").read_text())["skipped_steps"] == 1


def test_too_many_nonfinite_steps_in_a_row_stop(run_config, tmp_path, monkeypatch, capfd):
    config = run_config(
        "mlm",
        data={"validation": None},
        train={"max_steps": 6, "max_nonfinite_in_a_row": 2},
    )
    nan_loss_at(monkeypatch, {2, 4, 5})
    assert cli("train", config) == 3
    assert "at step 5 (2 in a row, train.on_nonfinite=skip)" in capfd.readouterr().err
    assert loop_state(tmp_path / "run", 5)["skipped_steps"] == 3


NO_DROPOUT = {"config_overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}}


@pytest.mark.slow
def test_a_nan_loss_on_one_process_is_skipped_on_both(run_config, tmp_path, monkeypatch):
    """Under torchrun, the loss of step 3 is NaN on rank 1 only, with finite gradients: only
    the shared decision stops rank 0 from stepping. Both skip it, their weights stay
    bitwise equal, and the run is the one process run that skipped step 3."""
    config = run_config(
        "mlm",
        model=NO_DROPOUT,
        data={"validation": None},
        train={"max_steps": 5, "micro_batch_size": 2},  # 2 per step on each of 2 processes
    )
    sums = tmp_path / "checksums"
    sums.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(free_port()), "tests/nonfinite_launch.py", "train", config]
    env = subprocess_env(
        PYTHONPATH=f"{REPO}:{REPO / 'tests'}",
        NAN_STEPS="3",
        NAN_RANK="1",
        NAN_GRADIENTS="finite",
        CHECKSUMS=str(sums),
    )
    done = subprocess.run(
        [str(part) for part in command], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert [r["skipped_steps"] for r in read_metrics(run_dir)] == [0, 0, 1, 1, 1]
    ranks = [[json.loads(line) for line in (sums / f"rank{r}.jsonl").open()] for r in (0, 1)]
    assert ranks[0] == ranks[1]  # bitwise the same weights on both, after every step
    assert [step["skipped"] for step in ranks[0]] == [False, False, True, False, False]
    digests = [step["sha256"] for step in ranks[0]]
    assert digests[2] == digests[1] != digests[3]
    warnings = [line for line in done.stderr.splitlines() if "warning: non-finite" in line]
    assert warnings == [
        "warning: non-finite loss or gradient norm at step 3: the update was skipped on all "
        "processes (1 skipped so far)"
    ]

    # One process (4 micro-batches a step), NaN in step 3: the same run up to float rounding.
    reference = tmp_path / "reference"
    nan_loss_at(monkeypatch, {3}, accumulation=4)
    assert cli("train", config, f"output_dir={reference}") == 0
    expected = read_metrics(reference)
    assert [r["skipped_steps"] for r in expected] == [0, 0, 1, 1, 1]
    for got, want in zip(read_metrics(run_dir), expected, strict=True):
        assert (got["loss"] is None) == (want["loss"] is None)
        assert got["loss"] is None or got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    ours, theirs = final_weights(run_dir), final_weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)


def test_optimizer_step_skips_a_nan_loss(tiny_bert, bert_tokenizer):
    from transformers import AutoModelForMaskedLM

    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = AutoModelForMaskedLM.from_pretrained(tiny_bert)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, bert_tokenizer.vocab_size, (4, 16), generator=generator)
    labels = torch.where(torch.rand(4, 16, generator=generator) < 0.3, ids, -100)
    window = [
        {
            "input_ids": ids[i : i + 2],
            "attention_mask": torch.ones_like(ids[i : i + 2]),
            "labels": labels[i : i + 2],
        }
        for i in (0, 2)
    ]

    calls = itertools.count()

    def nan_in_second(logits, labels, weight=None):
        loss_sum, count = TASKS["mlm"].loss(logits, labels, weight)
        return (loss_sum * float("nan") if next(calls) == 1 else loss_sum), count

    spec = dataclasses.replace(TASKS["mlm"], loss=nan_in_second)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = optimizer_step(
        model, window, spec, accelerator, optimizer, scheduler, 1.0, Requests(stop=True)
    )
    assert result.skipped
    assert result.requests == Requests(stop=True, save=False)
    assert all(torch.isfinite(t).all() for t in vars(result.sums).values())
    assert_same_tensors(model.state_dict(), before)
    assert scheduler.last_epoch == 0 and not optimizer.state
    assert all(p.grad is None for p in model.parameters())
    result = optimizer_step(model, window, TASKS["mlm"], accelerator, optimizer, scheduler, 1.0)
    assert not result.skipped and result.requests == Requests()
    assert scheduler.last_epoch == 1
    assert not torch.equal(
        model.state_dict()["bert.embeddings.word_embeddings.weight"],
        before["bert.embeddings.word_embeddings.weight"],
    )


# --- non-finite evaluations ----------------------------------------------------------------


def strict_json(path: Path) -> dict:
    """JSON as any reader other than Python's reads it: NaN and Infinity are not JSON."""

    def refuse(token: str):
        raise AssertionError(f"{path.name} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def nan_evaluations_at(monkeypatch, which: set[int]) -> None:
    """Make every number of the given evaluations (1-based) NaN."""
    real, calls = trainer.run.train.evaluate, itertools.count(1)

    def evaluate(*args, **kwargs):
        results = real(*args, **kwargs)
        if next(calls) in which:
            return {k: float("nan") if isinstance(v, float) else v for k, v in results.items()}
        return results

    monkeypatch.setattr(trainer.run.train, "evaluate", evaluate)


def test_a_nan_evaluation_is_never_the_best(run_config, tmp_path, monkeypatch):
    config = run_config(
        "classification", train={"max_steps": 6}, eval={"every_steps": 2, "metric": "loss"}
    )
    nan_evaluations_at(monkeypatch, {1, 3})  # steps 2 and 6; step 4 is finite
    assert cli("train", config) == 0
    results = strict_json(tmp_path / "run" / "eval_results.json")
    assert results["best_step"] == 4
    evaluations = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert [r["eval_loss"] is None for r in evaluations] == [True, False, True]


def test_a_run_whose_every_evaluation_is_nan_finishes_with_its_last_model(
    run_config, tmp_path, monkeypatch
):
    config = run_config("classification", train={"max_steps": 4}, eval={"every_steps": 2})
    nan_evaluations_at(monkeypatch, {1, 2, 3})
    assert cli("train", config) == 0
    results = strict_json(tmp_path / "run" / "eval_results.json")
    assert results["best_step"] is None and results["steps"] == 4
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_restarts_that_stop_on_nan_again_keep_the_last_good_checkpoint(run_config, tmp_path, capfd):
    """keep_last=1, and every start meets a NaN again at its first step: each stop saves a
    checkpoint, which must never push the last good one (step 4) out."""
    config = run_config(
        "mlm",
        data={"validation": None},
        train={"max_steps": 10, "on_nonfinite": "stop"},
        checkpoint={"every_steps": 2, "keep_last": 1},
    )
    run_dir = tmp_path / "run"
    for nan_at, stop in ((5, 5), (1, 6), (1, 7)):  # counted from each start's first step
        with pytest.MonkeyPatch.context() as patch:
            nan_loss_at(patch, {nan_at})
            assert cli("train", config) == 3
        err = capfd.readouterr().err
        assert f"non-finite loss or gradient norm at step {stop} (" in err, err
        assert saved_steps(run_dir) == [4, stop]
    assert problem_with(checkpoint_dir(run_dir, 4)) is None
    assert is_fault_checkpoint(checkpoint_dir(run_dir, 7))
    assert not is_fault_checkpoint(checkpoint_dir(run_dir, 4))
    # The good checkpoint still resumes (say once the data is fixed); once a good one is
    # newer than the fault one (step 8), the fault one goes, and keep_last rules again.
    good = checkpoint_dir(run_dir, 4)
    assert cli("train", config, f"train.resume={good}") == 0
    assert f"resuming from {good} (step 4)" in capfd.readouterr().err
    assert json.loads((run_dir / "eval_results.json").read_text())["skipped_steps"] == 0
    assert saved_steps(run_dir) == [10]
