"""The head warm-up (trainer/run/optim.py): the parameters a checkpoint lacked are known at
load, learn alone for the first `train.head_warmup_ratio` of the steps while every other
parameter has LR 0 (and so no weight decay), then the usual warm-up and decay; a resume
inside the warm-up is exact, and the run summary names them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_run_config, read_metrics
from interrupted_runs import (
    assert_same_tensors,
    cli,
    comparable,
    final_weights,
    stop_in_process,
)
from test_config import error_of, minimal
from transformers import AutoModel, AutoTokenizer

from trainer.config import ModelConfig, TrainConfig
from trainer.model.load import load_model, load_tokenizer
from trainer.run.optim import (
    build_optimizer,
    build_scheduler,
    head_warmup,
    lr_factor,
    new_parameters,
)
from trainer.run.stop import EXIT_PREEMPTED
from trainer.tasks.registry import TASKS

MLM_HEAD = {
    "cls.predictions.bias",
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
}


@pytest.fixture(scope="module")
def headless_bert(tmp_path_factory, tiny_bert) -> Path:
    """The tiny BERT saved without its MLM head, as all-MiniLM-L6-v2 ships."""
    folder = tmp_path_factory.mktemp("headless-bert")
    AutoModel.from_pretrained(tiny_bert).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)
    return folder


def _mlm_model(folder: Path) -> torch.nn.Module:
    cfg = ModelConfig(name_or_path=str(folder))
    return load_model(cfg, TASKS["mlm"], load_tokenizer(cfg, TASKS["mlm"]), seed=0)


def test_the_missing_mlm_head_is_what_is_new(headless_bert, tiny_bert):
    model = _mlm_model(headless_bert)
    assert set(new_parameters(model)) == MLM_HEAD  # the tied decoder weight is loaded
    warmup = head_warmup(model, TrainConfig(head_warmup_ratio=0.25), 0.0, total_steps=40)
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    assert warmup.count == vocab + hidden * hidden + 3 * hidden
    assert warmup.steps == 10
    assert warmup.line() == (
        f"head warm-up: {warmup.count:,} new parameters learn alone for the first 10 steps"
    )
    # a checkpoint with its head: nothing new, so no warm-up whatever the ratio
    whole = _mlm_model(tiny_bert)
    assert new_parameters(whole) == []
    assert head_warmup(whole, TrainConfig(head_warmup_ratio=0.5), 0.1, 40).steps == 0


def test_task_default_applies_when_the_ratio_is_unset(headless_bert):
    model = _mlm_model(headless_bert)
    default = TASKS["mlm"].head_warmup_ratio
    assert head_warmup(model, TrainConfig(), default, 100).steps == round(default * 100)
    assert head_warmup(model, TrainConfig(head_warmup_ratio=0.0), default, 100).steps == 0
    assert TASKS["classification"].head_warmup_ratio == 0.0


def test_schedule_per_group(headless_bert):
    model = _mlm_model(headless_bert)
    cfg = TrainConfig(lr=1e-3, head_lr=4e-3, warmup_ratio=0.1, head_warmup_ratio=0.2)
    total, head_steps = 50, 10
    optimizer = build_optimizer(model, cfg, frozenset(new_parameters(model)))
    scheduler = build_scheduler(optimizer, cfg, total, head_steps)
    head = lr_factor("linear", 5, total)
    encoder = lr_factor("linear", 4, total - head_steps)
    assert any(g["head"] for g in optimizer.param_groups)
    assert any(not g["head"] for g in optimizer.param_groups)
    for step in range(total):
        for group in optimizer.param_groups:
            if group["head"]:
                assert group["lr"] == 4e-3 * head(step)
            elif step < head_steps:
                assert group["lr"] == 0.0
            else:
                assert group["lr"] == 1e-3 * encoder(step - head_steps)
        optimizer.step()
        scheduler.step()


def test_without_warmup_the_schedule_is_unchanged(headless_bert):
    model = _mlm_model(headless_bert)
    cfg = TrainConfig(lr=1e-3, warmup_ratio=0.1)
    optimizer = build_optimizer(model, cfg, frozenset(new_parameters(model)))
    scheduler = build_scheduler(optimizer, cfg, 30, 0)
    factor = lr_factor("linear", 3, 30)
    for step in range(30):
        assert {g["lr"] for g in optimizer.param_groups} == {1e-3 * factor(step)}
        optimizer.step()
        scheduler.step()


def _train_steps(model, optimizer, scheduler, steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(5, model.config.vocab_size, (4, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()


def test_encoder_is_bitwise_unchanged_during_the_warmup(headless_bert):
    model = _mlm_model(headless_bert)
    new = frozenset(new_parameters(model))
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, warmup_ratio=0.0, head_warmup_ratio=0.5)
    optimizer = build_optimizer(model, cfg, new)
    scheduler = build_scheduler(optimizer, cfg, 8, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_steps(model, optimizer, scheduler, 4)
    after = dict(model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == new
    _train_steps(model, optimizer, scheduler, 1)  # the encoder's first step with LR > 0
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert "bert.encoder.layer.0.attention.self.query.weight" in moved
    assert "bert.embeddings.word_embeddings.weight" in moved


WARMUP_RUN = {
    "data": {"validation": None, "validation_split": 0.1},
    "train": {"epochs": 2, "global_batch_size": 8, "micro_batch_size": 4, "lr": 5e-3},
    "eval": {"every_steps": 0},
    "checkpoint": {"every_steps": 2, "keep_last": 2},
    "log": {"every_steps": 1, "trackers": []},
}


@pytest.mark.slow
def test_resume_inside_the_warmup_is_exact_and_the_summary_names_the_head(
    tmp_path, headless_bert, tiny_gpt2, data_dir, capfd
):
    models = {"bert": headless_bert, "clm": tiny_gpt2}
    (tmp_path / "ref").mkdir()
    (tmp_path / "cut").mkdir()
    settings = {**WARMUP_RUN, "train": {**WARMUP_RUN["train"], "head_warmup_ratio": 0.5}}
    reference = make_run_config(tmp_path / "ref", "mlm", models, data_dir, **settings)
    assert cli("train", reference) == 0
    err = capfd.readouterr().err
    summary = json.loads((tmp_path / "ref" / "run" / "run_summary.json").read_text())
    assert set(summary["new_parameters"]) == MLM_HEAD
    steps = summary["head_warmup_steps"]
    assert steps == round(0.5 * summary["total_steps"]) and steps > 3
    line = f"head warm-up: {summary['new_parameter_count']:,} new parameters learn alone for "
    assert f"{line}the first {steps} steps" in err
    lrs = [r["lr"] for r in read_metrics(tmp_path / "ref" / "run") if "lr" in r]
    # the logged LR is the first group's (the encoder's), for the step after the logged one
    assert lrs[: steps - 1] == [0.0] * (steps - 1)
    assert lrs[steps - 1] == 5e-3

    cut = make_run_config(tmp_path / "cut", "mlm", models, data_dir, **settings)
    assert stop_in_process(cut, 3) == EXIT_PREEMPTED  # saved at step 3 < the warm-up's end
    assert cli("train", cut) == 0
    assert comparable(tmp_path / "cut" / "run") == comparable(tmp_path / "ref" / "run")
    assert_same_tensors(
        final_weights(tmp_path / "cut" / "run"), final_weights(tmp_path / "ref" / "run")
    )


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"head_warmup_ratio": 1.0}, "train.head_warmup_ratio: must be in [0, 1), got 1.0"),
        ({"head_warmup_ratio": -0.1}, "train.head_warmup_ratio: must be in [0, 1), got -0.1"),
        ({"head_lr": 0}, "train.head_lr: must be > 0, got 0"),
        ({"head_lr": "fast"}, "train.head_lr"),
    ],
)
def test_bad_values_are_refused_in_one_line(train, message):
    error = error_of(minimal(train=train))
    assert message in error
    assert len(error.splitlines()) == 1
